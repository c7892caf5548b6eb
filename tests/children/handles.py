"""Receive a listening socket, accept one connection on it, and answer; or send back an fd."""
import os

from forkio import parent

message, handle = parent.recv(with_handle=True)
if message == "serve":
    conn, _ = handle.accept()
    conn.sendall(b"hello from " + str(os.getpid()).encode())
    conn.close()
    parent.send("served")
elif message == "pipe":
    os.write(handle, b"written by the child")
    os.close(handle)
    parent.send("written")
elif message == "give":
    r, w = os.pipe()
    os.write(w, b"from the child's pipe")
    os.close(w)
    parent.send("take", r)
    os.close(r)
parent.recv()
