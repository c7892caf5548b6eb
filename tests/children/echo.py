"""Echo every message back; announce readiness first."""
from forkio import parent

parent.send("ready")
for message in parent:
    parent.send(message)
