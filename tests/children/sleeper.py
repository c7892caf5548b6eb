"""Start, say so, then sleep (to be killed); with 'grandchild', fork one that sleeps too."""
import sys
import time

from forkio import fork, parent

if len(sys.argv) > 1 and sys.argv[1] == "grandchild":
    child = fork(__file__)
    parent.send({"grandchild": child.pid})
else:
    parent.send("sleeping")
time.sleep(600)
