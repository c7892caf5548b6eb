"""Functions for the CLI tests, run by `forkio map tests/cli_tasks.py:NAME`."""

from __future__ import annotations

import os
import time
from typing import Any


def shout(text: str) -> str:
    if text == "boom":
        raise ValueError("boom!")
    if text == "die":
        os._exit(3)
    if text == "hang":
        time.sleep(600)
    return text.upper()


def double(value: Any) -> Any:
    return value["n"] * 2 if isinstance(value, dict) else value * 2


def slow(text: str) -> str:
    time.sleep(0.2)
    return text


not_callable = 42



def awkward(name: str) -> Any:
    """Values JSON cannot hold exactly."""
    return {
        "nan": float("nan"),
        "inf": float("inf"),
        "nested_nan": {"scores": [1.0, float("-inf")]},
        "set": {1, 2, 3},
        "bytes": b"\x00\xff",
        "object": object(),
        "bad_repr": _BadRepr(),
        "tuple": (1, 2),
        "int_keys": {1: "a"},
        "text": "plain",
    }[name]


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")
