"""``forkio serve MODULE:APP`` and ``forkio cluster SCRIPT.py``: their options and what they run."""

from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import sys
from typing import Any

from .._cli import UsageError, non_negative_int, positive_int
from ._settings import MIN_UPTIME, REUSE_PORT_DEFAULT, ClusterError, Settings, parse_address

SERVE_MODULE = "forkio.cluster._serve"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"seconds must be >= 0, not {text!r}")
    return value


def _add_common(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--workers", "-w", type=positive_int, default=None, metavar="N",
                     help="worker processes (default: one per CPU)")
    cmd.add_argument("--timeout", type=_seconds, default=30.0, metavar="S",
                     help="kill a worker whose event loop is silent this long (0: never; default 30)")
    cmd.add_argument("--graceful-timeout", type=_seconds, default=30.0, metavar="S",
                     help="how long a stopping worker may finish its requests (default 30)")
    cmd.add_argument("--min-uptime", type=_seconds, default=None, metavar="S",
                     help="a worker that exits sooner after it is ready is an unstable start: restarts back off, "
                          f"and 5 in 10 s stop the cluster (default {MIN_UPTIME:g})")
    cmd.add_argument("--reuse-port", action=argparse.BooleanOptionalAction, default=None,
                     help="each worker slot accepts on its own SO_REUSEPORT socket, kept by the primary "
                          "(default on Linux: spreads connections more evenly); --no-reuse-port: one shared socket")
    cmd.add_argument("--quiet", action="store_true", help="no log lines from the primary")


def add_commands(commands: Any) -> None:
    """Declare ``forkio serve`` and ``forkio cluster`` on the CLI's subparsers."""
    serve = commands.add_parser(
        "serve", help="serve an ASGI or WSGI app with uvicorn in N worker processes on one socket",
        description="Serve MODULE:APP with uvicorn in each worker, on sockets the primary binds once. "
                    "SIGHUP reloads with fresh code and drops no request; SIGTERM stops gracefully; "
                    "SIGINT/SIGQUIT at once; SIGTTIN/SIGTTOU add or remove a worker. Needs forkio[serve].")
    serve.add_argument("app", metavar="MODULE:APP", help="the application, e.g. myapp.main:app")
    serve.add_argument("--bind", "-b", action="append", default=None, metavar="HOST:PORT|unix:PATH",
                       help="an address to serve (repeatable; default 127.0.0.1:8000)")
    serve.add_argument("--interface", choices=("asgi", "wsgi"), default="asgi")
    serve.add_argument("--max-requests", type=positive_int, default=None, metavar="N",
                       help="recycle a worker after N requests (a replacement starts first)")
    serve.add_argument("--max-requests-jitter", type=non_negative_int, default=0, metavar="N",
                       help="plus a random 0..N, so that workers do not recycle together")
    serve.add_argument("--preload", action="store_true",
                       help="import the app once in the zygote workers start from (a reload starts a new one)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    _add_common(serve)
    serve.set_defaults(run=run_serve)

    cluster = commands.add_parser(
        "cluster", help="run a script written with forkio.cluster.run() (or any script) as a cluster",
        description="Run SCRIPT.py as a cluster's primary: the script's cluster.run(serve, ...) forks the "
                    "workers; options given here override its own.")
    cluster.add_argument("script", metavar="SCRIPT.py")
    cluster.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    _add_common(cluster)
    cluster.set_defaults(run=run_cluster)


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    reuse_port = REUSE_PORT_DEFAULT if args.reuse_port is None else args.reuse_port
    return Settings(timeout=args.timeout or None, graceful_timeout=args.graceful_timeout, reuse_port=reuse_port,
                    min_uptime=MIN_UPTIME if args.min_uptime is None else args.min_uptime, **extra)


def run_serve(args: argparse.Namespace) -> int:
    """``forkio serve``: the primary binds, workers run ``forkio.cluster._serve``."""
    if ":" not in args.app or args.app.startswith(":") or args.app.endswith(":"):
        raise UsageError(f"expected MODULE:APP, not {args.app!r}")
    try:
        binds = [parse_address(b) for b in (args.bind or ["127.0.0.1:8000"])]
    except ClusterError as exc:
        raise UsageError(str(exc)) from None
    if importlib.util.find_spec("uvicorn") is None:  # here: one line, not a traceback per worker
        raise UsageError("forkio serve needs uvicorn: pip install 'forkio[serve]'")
    module = args.app.split(":", 1)[0]
    settings = _settings(args, wait_ready=True, max_requests=args.max_requests,
                         max_requests_jitter=args.max_requests_jitter, binds=binds,
                         options={"app": args.app, "interface": args.interface, "access_log": args.access_log})
    from . import _supervise

    sys.path.insert(0, os.getcwd())  # MODULE is found where the command runs, as uvicorn finds it
    try:
        _supervise(settings, workers=args.workers, target=("module", SERVE_MODULE, []),
                  preload=(module,) if args.preload else (), log=not args.quiet, binds=binds,
                  libraries=_server_modules(),
                  env={"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))})
    except OSError as exc:
        print(f"forkio serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _server_modules() -> list[str]:
    """What every `forkio serve` worker imports: preloaded once in the zygote, workers start warm."""
    wanted = ["uvicorn", "uvicorn.config", "uvicorn.server", "uvicorn.lifespan.on", "uvicorn.middleware.asgi2"]
    optional = {"uvloop": ["uvloop"], "httptools": ["httptools", "uvicorn.protocols.http.httptools_impl"],
                "h11": ["h11", "uvicorn.protocols.http.h11_impl"]}
    for probe, names in optional.items():
        if importlib.util.find_spec(probe) is not None:
            wanted += names
    return wanted


def run_cluster(args: argparse.Namespace) -> int:
    """``forkio cluster SCRIPT.py``: run the script as the primary, with these options as defaults for run()."""
    if not os.path.isfile(args.script):
        raise UsageError(f"no such script: {args.script!r}")
    from . import _defaults

    _defaults.update(workers=args.workers, timeout=args.timeout or None, graceful_timeout=args.graceful_timeout,
                     min_uptime=args.min_uptime, reuse_port=args.reuse_port, log=not args.quiet)
    sys.argv = [args.script, *args.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
