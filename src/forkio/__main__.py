"""The ``forkio`` command line: ``forkio map`` (parallel map of a Python function) and ``forkio demo``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ._cli import EXIT_USAGE, UsageError, add_map_command, parser


def _demo(args: argparse.Namespace) -> int:
    import forkio

    started = time.perf_counter()
    children = [forkio.fork(module="forkio._demo_worker") for _ in range(args.children)]
    for child in children:
        hello = child.recv(timeout=30)
        print(f"child {hello['hello']} is up ({(time.perf_counter() - started) * 1000:.1f} ms after the first fork)")
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
    for child in children:
        child.close()
        print(f"{child!r}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``forkio`` command."""
    cli = parser()
    commands = cli.add_subparsers(dest="command", required=True)
    map_parser = add_map_command(commands)
    demo = commands.add_parser("demo", help="fork a few children and exchange messages with them")
    demo.add_argument("--children", type=int, default=3)
    demo.add_argument("--jobs", type=int, default=6)
    demo.set_defaults(run=_demo)
    from .cluster._cli import add_commands as add_cluster_commands

    add_cluster_commands(commands)  # forkio serve, forkio cluster
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        if words[:1] == ["map"]:
            # Inputs and options in any order (forkio map f a --timeout 5 b), as users type them.
            args = map_parser.parse_intermixed_args(words[1:])
        else:
            args = cli.parse_args(words)
        return int(args.run(args))
    except UsageError as exc:
        print(f"forkio: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
