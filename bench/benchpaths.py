"""Paths as the benchmark reports show them: relative to the repository, as a reader's clone has them."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shown(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it, else as it is."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path
