"""send_many() N messages and exit at once. With "hold", first fork a grandchild that keeps the
channel's socket open for a while (so no EOF follows the exit) and send its pid."""
import os
import sys
import time

from forkio import parent

if sys.argv[2:] == ["hold"]:
    pid = os.fork()
    if pid == 0:
        time.sleep(20)
        os._exit(0)
    parent.send(pid)
parent.send_many(range(int(sys.argv[1])))
sys.exit(0)
