"""Large payloads: 'sum' answers each array's sum (and this process's fds/segments on request);
'send N MB' sends an array of N MB and exits at once; 'flood' sends arrays until killed;
'echo' sends back what it gets."""
import os
import sys

import numpy as np

from forkio import _shm, parent

mode = sys.argv[1]
if mode == "sum":
    for message in parent:
        if isinstance(message, str) and message == "census":
            import gc

            gc.collect()
            parent.send({"fds": len(os.listdir("/proc/self/fd")), "segments": _shm.mapped_segments()})
        else:
            parent.send(float(np.asarray(message).sum()))
elif mode == "send":
    size = int(sys.argv[2]) * 1024 * 1024
    parent.send(np.full(size // 8, 2.0))
    os._exit(0)  # at once: the segment must outlive its sender
elif mode == "flood":
    while True:
        parent.send(np.full(2 * 1024 * 1024 // 8, 3.0))
elif mode == "echo":
    for message in parent:
        parent.send(message)
