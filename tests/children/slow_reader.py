"""Say ready, sleep (so the parent's big send blocks midway), then answer each message with its length."""
import sys
import time

from forkio import parent

parent.send("ready")
time.sleep(float(sys.argv[1]))
for message in parent:
    parent.send(len(message))
