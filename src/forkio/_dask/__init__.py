"""The Dask backend of ``forkio.Pool``: ``Pool(cluster=...)`` runs tasks on a Dask distributed cluster.

Dask schedules, forkio isolates and times out: each Dask task runs one forkio task (a single
call, or a chunk of ``map``'s inputs) in a forkio pool kept inside the Dask worker process, so
a segfault, an OOM kill or a timeout kills only a forkio child and the Dask worker lives on.

Importing this package imports nothing of Dask; ``pool_class()`` does, on demand.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._errors import DaskNotInstalled as DaskNotInstalled

if TYPE_CHECKING:
    from ._client import DaskPool


def pool_class() -> type[DaskPool]:
    """``DaskPool``, or ``DaskNotInstalled`` (one line, saying what to install) without ``distributed``."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise DaskNotInstalled("Pool(cluster=...) needs Dask distributed: pip install 'forkio[dask]'") from None
    from ._client import DaskPool

    return DaskPool
