"""Run with fork(module='pkg.worker')."""
import sys

from forkio import parent

parent.send({"module": __name__, "argv": sys.argv, "spec": __spec__.name if __spec__ else None})
