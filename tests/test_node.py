"""Node interop both ways: Node's own IPC wire format, handles included."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import forkio
from forkio import SerializationError


def test_python_parent_node_child(children: Path) -> None:
    """A .js script becomes a Node child speaking json; process.send/on('message') just work."""
    with forkio.fork(children / "echo.js") as child:
        assert child.recv(timeout=20) == "ready"
        message = {"a": [1, 2.5, None, True], "s": "héllo \"q\" \n ☃ \u2028"}
        child.send(message)
        assert child.recv(timeout=10) == {"echo": message}
        with pytest.raises(SerializationError):
            child.send(float("nan"))  # would crash the Node child
        child.send("exit")
        assert child.wait(timeout=10) == 3


def test_python_parent_hands_server_to_node(children: Path) -> None:
    """A listening socket goes to Node as net.Server (NODE_HANDLE), and comes back the same way."""
    server = socket.create_server(("127.0.0.1", 0))
    with server, forkio.fork(children / "echo.js") as child:
        assert child.recv(timeout=20) == "ready"
        child.send("take this", server)
        reply, handle = child.recv(timeout=10, with_handle=True)
        assert reply == {"got": "handle", "kind": "Server", "port": server.getsockname()[1]}
        assert isinstance(handle, socket.socket)
        assert handle.getsockname() == server.getsockname()
        handle.close()
        child.send("after the handle")  # Node answered NODE_HANDLE_ACK and the channel flows on
        assert child.recv(timeout=10) == {"echo": "after the handle"}


def test_node_parent_python_child(children: Path) -> None:
    """Node's child_process.fork() runs a forkio script unchanged, handles included."""
    env = {k: v for k, v in os.environ.items() if k != "NODE_EXTRA_CA_CERTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(forkio.__file__).parent.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        ["node", str(children / "node_parent.js"), str(children / "for_node.py"), sys.executable],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0] == {"message": {"done": 1}, "handle": None}
    assert lines[1] == {"message": {"done": 2}, "handle": None}
    assert lines[2]["message"]["served"] == "hi from node"
    assert lines[2]["message"]["kind"] == "SOCK_STREAM"
    assert lines[-1] == {"exit": 0, "signal": None}
