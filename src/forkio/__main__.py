"""The ``forkio`` command line: ``forkio map`` (parallel map of a Python function) and ``forkio demo``.

Each subcommand is declared by a function ``add_<name>_command(commands)`` that adds its parser to
``commands`` (argparse's subparsers), sets ``run=<function(args) -> exit status>`` as a default,
and returns the parser; ``COMMANDS`` lists them. A parser that sets ``intermixed=True`` gets its
options and positional arguments in any order. Errors are ``_cli.CliError`` (one line on stderr,
its ``status`` as the exit status).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from ._cli import EXIT_INTERRUPTED, CliError, Parser, add_map_command, non_negative_int, positive_int


def _demo(args: argparse.Namespace) -> int:
    import forkio

    started = time.perf_counter()
    children = [forkio.fork(module="forkio._demo_worker") for _ in range(args.children)]
    try:
        for child in children:
            hello = child.recv(timeout=30)
            since = (time.perf_counter() - started) * 1000
            print(f"child {hello['hello']} is up ({since:.1f} ms after the first fork)")
        for n in range(args.jobs):
            children[n % len(children)].send({"n": n})
        for n in range(args.jobs):
            reply = children[n % len(children)].recv(timeout=30)
            print(f"  {reply['n']}² = {reply['square']}  (from child {reply['pid']})")
        rounds = 2000
        t0 = time.perf_counter()
        for n in range(rounds):
            children[0].send({"n": n})
            children[0].recv(timeout=30)
        print(f"round trip, parent -> child -> parent: {(time.perf_counter() - t0) / rounds * 1e6:.1f} µs")
    finally:
        for child in children:
            child.close()
            print(f"{child!r}")
    return 0


def add_demo_command(commands: Any) -> argparse.ArgumentParser:
    """Declare ``forkio demo``."""
    demo: argparse.ArgumentParser = commands.add_parser(
        "demo", help="fork a few children and exchange messages with them",
        description="Fork a few children, send them work, and show timings.")
    demo.add_argument("--children", type=positive_int, default=3, metavar="N", help="children to fork (default: 3)")
    demo.add_argument("--jobs", type=non_negative_int, default=6, metavar="N",
                      help="messages to send them (default: 6)")
    demo.set_defaults(run=_demo)
    return demo


COMMANDS: tuple[Callable[[Any], argparse.ArgumentParser], ...] = (add_map_command, add_demo_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``forkio`` command; returns its exit status."""
    from .cluster._cli import add_commands as add_cluster_commands

    cli = Parser(prog="forkio", description="forkio: child processes with a message channel, and a crash-proof pool")
    cli.add_argument("--version", action="version", version=f"forkio {__version__}")
    commands = cli.add_subparsers(dest="command", metavar="COMMAND", required=True)
    intermixed = {}
    for add in COMMANDS:
        sub = add(commands)
        if sub.get_default("intermixed"):
            intermixed[sub.prog.rsplit(" ", 1)[-1]] = sub
    add_cluster_commands(commands)  # forkio serve, forkio cluster
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        if words and words[0] in intermixed:
            # Inputs and options in any order (forkio map f a --timeout 5 b), as users type them.
            args = intermixed[words[0]].parse_intermixed_args(words[1:])
        else:
            args = cli.parse_args(words)
        return int(args.run(args))
    except CliError as exc:
        print(f"forkio: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("forkio: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
