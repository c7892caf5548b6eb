"""bench/start.py: say "ready" at once, then wait for the parent to disconnect."""
from forkio import parent

parent.send("ready")
for _ in parent:
    pass
