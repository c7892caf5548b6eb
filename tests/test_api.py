"""The public surface: what __all__ promises exists, is documented, and errors form one tree."""

from __future__ import annotations

import subprocess
import sys

import forkio


def test_every_public_name_exists_and_is_documented() -> None:
    assert len(set(forkio.__all__)) == len(forkio.__all__)
    for name in forkio.__all__:
        obj = getattr(forkio, name)
        assert (obj.__doc__ or "").strip(), f"forkio.{name} has no docstring"
    assert set(forkio.__all__) <= set(dir(forkio))


def test_errors_form_one_tree_with_standard_bases() -> None:
    errors = [getattr(forkio, n) for n in forkio.__all__
              if isinstance(getattr(forkio, n), type) and issubclass(getattr(forkio, n), BaseException)]
    assert all(issubclass(e, forkio.ForkioError) for e in errors)
    assert issubclass(forkio.ChannelClosed, ConnectionError)
    assert issubclass(forkio.WaitTimeout, TimeoutError) and issubclass(forkio.TaskTimeout, TimeoutError)
    assert issubclass(forkio.PreloadError, ImportError)


def test_a_child_only_pays_for_what_it_uses() -> None:
    """`from forkio import parent` must not import asyncio, subprocess or the pool."""
    code = ("import sys; from forkio import parent; "
            "print(sorted(m for m in ('asyncio', 'subprocess', 'forkio._pool', 'concurrent.futures') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
