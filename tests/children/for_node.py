"""A Python child for a Node parent: answer jobs, then serve once on a server handed over by Node."""
import socket

from forkio import parent

for message, handle in iter(lambda: parent.recv(with_handle=True), None):
    if handle is not None:
        conn = socket.create_connection(handle.getsockname())
        reply = conn.recv(100).decode()
        conn.close()
        parent.send({"served": reply, "port": message["port"], "kind": handle.type.name})
        break
    parent.send({"done": message["job"]})
for _ in parent:
    pass
