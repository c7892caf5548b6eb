"""Errors of the Dask backend (no Dask import here: ``forkio.WorkerLost`` must be cheap to name)."""

from __future__ import annotations

from .._errors import ForkioError, WorkerCrashed


class DaskNotInstalled(ForkioError, ImportError):
    """``Pool(cluster=...)`` was asked for, but the ``distributed`` package is not installed."""


class WorkerLost(WorkerCrashed):
    """The Dask worker running the task disappeared (its process or host was lost)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.pid = 0  # the forkio child's pid is not known: it went with its Dask worker
        self.exit_code = None
        self.signal_code = None
        self.detail = ""
        ForkioError.__init__(self, f"Dask worker {address} was lost while it held this task")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.address,))
