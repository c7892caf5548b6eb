"""Append this process's pid to the file named by argv[1], then exit."""
import os
import sys

fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, f"{os.getpid()}\n".encode())
os.close(fd)
