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
