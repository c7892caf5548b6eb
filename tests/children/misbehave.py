"""Write something broken onto the channel, then wait to be told to go."""
import os
import socket
import struct
import sys

from forkio import parent

what = sys.argv[1]
sock: socket.socket = parent.channel.sock
if what == "garbage":
    sock.sendall(b"this is not a frame at all")
elif what == "half-frame":
    sock.sendall(struct.pack(">BBBBI", 0xF5, 0, 0, 0, 1000) + b"only a little")
    os._exit(0)
elif what == "huge-frame":
    sock.sendall(struct.pack(">BBBBI", 0xF5, 0, 0, 0, 2**31))
elif what == "bad-pickle":
    payload = b"\x80\x05not really pickle."
    sock.sendall(struct.pack(">BBBBI", 0xF5, 0, 0, 0, len(payload)) + payload)
    parent.send("after")
elif what == "json-garbage":
    sock.sendall(b'{not json}\n"after"\n')
elif what == "crash":
    parent.send("crashing")
    os.kill(os.getpid(), 11)
try:
    parent.recv()
except Exception:
    pass
