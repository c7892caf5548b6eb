"""Send N messages and exit at once with code 7 (messages sent right before exit must arrive)."""
import os
import sys

from forkio import parent

for i in range(int(sys.argv[1])):
    parent.send({"i": i, "pad": "x" * int(sys.argv[2]) if len(sys.argv) > 2 else ""})
sys.stdout.flush()
os._exit(7)
