"""A progress bar: tqdm when it is installed (the ``progress`` extra), plain text otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class ProgressBar:
    """Counts done and failed items; draws only on a terminal (quiet when piped)."""

    def __init__(self, total: int | None, *, description: str = "forkio", stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._tqdm: Any = None
        if self.enabled:
            try:
                from tqdm import tqdm  # type: ignore[import-untyped]
            except ImportError:
                pass
            else:
                self._tqdm = tqdm(total=total, desc=description, file=self.stream, unit="item", dynamic_ncols=True)

    def update(self, count: int = 1, *, failed: bool = False) -> None:
        self.done += count
        if failed:
            self.failed += count
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.update(count)
            if failed:
                self._tqdm.set_postfix(failed=self.failed, refresh=False)
            return
        now = time.monotonic()
        if now - self._last_draw >= 0.1:
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate else float("inf")
            text = f"{self.done}/{self.total} done, {self.failed} failed, {rate:.1f}/s, ETA {eta:.0f}s"
        else:
            text = f"{self.done} done, {self.failed} failed, {rate:.1f}/s"
        self.stream.write("\r" + text + " " * 4)
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
