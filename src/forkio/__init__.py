"""forkio: Node's ``child_process.fork()`` for Python, and more.

Fork a Python script or module (or a Node script) as a child process with a built-in message
channel, in sync or asyncio code; the child talks back through ``forkio.parent``.

Only what a child needs (``parent`` and the errors) is imported eagerly; the rest loads on
first use, so ``from forkio import parent`` costs a child a few milliseconds, not asyncio's import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import ChannelClosed as ChannelClosed
from ._errors import ForkioError as ForkioError
from ._errors import ProtocolError as ProtocolError
from ._errors import SerializationError as SerializationError
from ._errors import TaskTimeout as TaskTimeout
from ._errors import WaitTimeout as WaitTimeout
from ._errors import WorkerCrashed as WorkerCrashed
from ._parent import Parent as Parent
from ._parent import parent as parent

if TYPE_CHECKING:
    from . import cluster as cluster
    from ._aprocess import AsyncChildProcess as AsyncChildProcess
    from ._aprocess import AsyncParent as AsyncParent
    from ._aprocess import afork as afork
    from ._aprocess import aparent as aparent
    from ._dask._errors import WorkerLost as WorkerLost
    from ._pool import BrokenPool as BrokenPool
    from ._pool import Pool as Pool
    from ._pool import PoolClosed as PoolClosed
    from ._pool import RemoteError as RemoteError
    from ._pool import TaskFuture as TaskFuture
    from ._pool_stream import TaskOptions as TaskOptions
    from ._pool_stream import TaskResult as TaskResult
    from ._pool_worker import progress as progress
    from ._pool_worker import report as report
    from ._process import ChildProcess as ChildProcess
    from ._process import fork as fork
    from ._zygote import PreloadError as PreloadError
    from ._zygote import ZygoteError as ZygoteError
    from ._zygote import get_preload as get_preload
    from ._zygote import set_preload as set_preload

__version__ = "0.1.0"

_LAZY = {
    "AsyncChildProcess": "._aprocess",
    "AsyncParent": "._aprocess",
    "afork": "._aprocess",
    "aparent": "._aprocess",
    "ChildProcess": "._process",
    "fork": "._process",
    "Pool": "._pool",
    "BrokenPool": "._pool",
    "PoolClosed": "._pool",
    "RemoteError": "._pool",
    "TaskFuture": "._pool",
    "TaskOptions": "._pool_stream",
    "TaskResult": "._pool_stream",
    "progress": "._pool_worker",
    "report": "._pool_worker",
    "PreloadError": "._zygote",
    "ZygoteError": "._zygote",
    "get_preload": "._zygote",
    "set_preload": "._zygote",
    "WorkerLost": "._dask._errors",
}


def __getattr__(name: str) -> Any:
    if name == "cluster":  # a subpackage: ``forkio.cluster`` works after a plain ``import forkio``
        return importlib.import_module(".cluster", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'forkio' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"cluster"})


__all__ = [
    "AsyncChildProcess",
    "AsyncParent",
    "ChannelClosed",
    "BrokenPool",
    "ChildProcess",
    "ForkioError",
    "Parent",
    "Pool",
    "PoolClosed",
    "PreloadError",
    "ProtocolError",
    "RemoteError",
    "SerializationError",
    "TaskFuture",
    "TaskOptions",
    "TaskResult",
    "TaskTimeout",
    "WaitTimeout",
    "WorkerCrashed",
    "WorkerLost",
    "ZygoteError",
    "afork",
    "aparent",
    "cluster",
    "fork",
    "get_preload",
    "parent",
    "progress",
    "report",
    "set_preload",
]
