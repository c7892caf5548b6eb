"""bench/start.py: import numpy (as a real worker would), say "ready", wait for the disconnect."""
import numpy  # noqa: F401

from forkio import parent

parent.send("ready")
for _ in parent:
    pass
