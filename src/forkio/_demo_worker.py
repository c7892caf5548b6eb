"""The child side of ``forkio demo``: square numbers for the parent until it disconnects."""

from __future__ import annotations

import os

from forkio import parent


def main() -> None:
    parent.send({"hello": os.getpid()})
    for job in parent:
        parent.send({"n": job["n"], "square": job["n"] ** 2, "pid": os.getpid()})


if __name__ == "__main__":
    main()
