"""The ``redisengines`` command (also ``python -m redisengines``): a thin layer over the library.

Options map to ``REDISENGINES_*`` variables; ``--verbose`` configures logging (the library
never does). rich is imported only by the commands that print tables, so ``engine`` starts fast.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Annotated
from urllib.parse import urlsplit

import typer

from . import runfile
from .config import Settings

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


@app.command()
def status(url: Url = None, cluster: ClusterName = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
           verbose: Verbose = False) -> None:
    """Show the engines of a cluster, as read from Redis (P:engines and each inbox's XLEN)."""
    _logging(verbose)
    import redis

    from .keys import Keys
    from .registry import status as registry_status

    settings = _settings(url, cluster)
    shown = _shown(settings.redis_url or "")
    try:
        with redis.Redis.from_url(settings.redis_url or "", socket_connect_timeout=5,
                                  socket_timeout=10) as r:
            engines = registry_status(r, Keys(settings.cluster))
    except redis.RedisError as exc:
        raise _fail(f"cannot read cluster {settings.cluster!r}: {exc}") from None
    if as_json:
        typer.echo(json.dumps({"engines": engines, "cluster": settings.cluster, "url": shown}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cluster {settings.cluster!r} at {shown}")
    for column in ("id", "host", "pid", "state", "running", "completed", "queued"):
        table.add_column(column, justify="right" if column in ("id", "pid") else "left")
    for e in engines:
        state = str(e.get("state"))
        state += "" if e["alive"] or state == "dead" else " (no lease)"
        running = f"{e['op']} {e['running']}" if e.get("running") else ""
        table.add_row(str(e["id"]), str(e.get("host")), str(e.get("pid")), state, running,
                      str(e.get("completed", "")), str(e["queued"]))
    Console().print(table if engines else
                    f"No engines registered in cluster {settings.cluster!r} at {shown}.")


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
