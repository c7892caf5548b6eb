"""A pool worker process starts here (``fork(module="forkio._pool_main")``).

A separate module, so that ``forkio._pool_worker`` itself can be imported ahead of time (the
zygote preloads it) and is never run a second time as ``__main__``.
"""

from forkio._pool_worker import main

main()
