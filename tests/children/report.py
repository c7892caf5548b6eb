"""Report everything a child could notice about how it was started; then echo, or act on argv."""
import os
import random
import signal
import sys

from forkio import parent

mode = sys.argv[1] if len(sys.argv) > 1 else "report"


def disposition(sig: int) -> str:
    handler = signal.getsignal(sig)
    if handler is signal.default_int_handler:
        return "default_int_handler"
    return {signal.SIG_DFL: "DFL", signal.SIG_IGN: "IGN"}.get(handler, repr(handler))


def stream(s: object) -> object:
    if s is None:
        return None
    return {"encoding": s.encoding, "errors": s.errors, "line_buffering": s.line_buffering,
            "write_through": getattr(s, "write_through", None), "isatty": s.isatty(), "mode": s.mode,
            "name": s.name, "fileno": s.fileno()}


if mode == "report":
    parent.send({
        "argv": sys.argv, "orig_argv": sys.orig_argv[3:], "path": sys.path, "cwd": os.getcwd(),
        "name": __name__, "file": __file__, "ppid": os.getppid(), "pid": os.getpid(),
        "env": dict(os.environ), "umask": os.umask(0o022),
        "core_limit": __import__("resource").getrlimit(__import__("resource").RLIMIT_CORE),
        "signals": {int(s): disposition(s) for s in signal.valid_signals()
                    if s not in (signal.SIGKILL, signal.SIGSTOP)},
        "stdin": stream(sys.stdin), "stdout": stream(sys.stdout), "stderr": stream(sys.stderr),
        "fds": len(os.listdir("/proc/self/fd")),  # the channel's number is the parent's for it: may differ
        "parent": repr(parent).split(" pid=")[0], "random": random.random(),
        "numpy_random": sys.modules["numpy"].random.random() if "numpy" in sys.modules else None,
        "modules": sorted(m for m in ("csv", "numpy", "decimal") if m in sys.modules),
        "sid": os.getsid(0) == os.getpid(), "pgid": os.getpgid(0),
    })
    parent.recv()
elif mode == "print":
    print("to stdout", sys.argv[2:])
    print("to stderr", file=sys.stderr)
    parent.send("printed")
    parent.recv()
elif mode == "stdin":
    parent.send(sys.stdin.readline())
elif mode == "raise":
    raise ValueError("raised in the child")
elif mode == "interrupt":
    raise KeyboardInterrupt
elif mode == "exit":
    sys.exit(int(sys.argv[2]))
