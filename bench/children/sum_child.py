"""bench/bigdata.py: answer each array with its sum."""
from forkio import parent

parent.send("ready")
for array in parent:
    parent.send(float(array.sum()))
