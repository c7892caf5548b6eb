"""Report how we were started."""
import os
import sys

from forkio import parent

parent.send({
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "name": __name__,
    "path0": sys.path[0],
    "channel_env": [k for k in os.environ if k.startswith("NODE_CHANNEL")],
    "custom": os.environ.get("FORKIO_TEST_VAR"),
})
