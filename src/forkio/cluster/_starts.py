"""When the primary starts workers again: unstable starts, the crash-loop window, the back-off.

A start is unstable when its worker dies, unasked, before it is ready or within ``min_uptime``
seconds after, whatever its exit code (PM2's ``min_uptime``; systemd's ``StartLimitBurst`` over
``StartLimitIntervalSec``). Pure: the supervisor says what happened and when, and carries out
what comes back; tested without processes.
"""

from __future__ import annotations

from collections import deque

BOOT_FAILURES = 5  # this many unstable starts ...
BOOT_WINDOW = 10.0  # ... within this many seconds are a crash loop
# Unstable starts in a row wait before the next start, doubling from the second on (the first
# is replaced at once), so a worker that keeps exiting cannot keep the CPUs busy starting it.
RESTART_DELAY = 0.1
RESTART_DELAY_MAX = 10.0


def restart_delay(in_a_row: int) -> float:
    """How long to wait before starting a worker after ``in_a_row`` unstable starts in a row."""
    if in_a_row <= 1:
        return 0.0
    return min(RESTART_DELAY * 2.0 ** (in_a_row - 2), RESTART_DELAY_MAX)


class StartLimit:
    """The unstable starts of one cluster: the recent ones (the window) and those in a row."""

    def __init__(self) -> None:
        self.recent: deque[float] = deque()  # when the unstable starts in the window ended
        self.in_a_row = 0  # since a worker last stayed up
        self.hold_until: float | None = None  # no worker is started before this

    def unstable(self, now: float, *, restarting: bool) -> tuple[bool, float]:
        """Count an unstable start that ended at ``now``: (a crash loop?, the wait before the next
        start). ``restarting``: a replacement will be started (the cluster keeps a number)."""
        self.recent.append(now)
        while self.recent and now - self.recent[0] > BOOT_WINDOW:
            self.recent.popleft()
        if len(self.recent) >= BOOT_FAILURES:
            self.reset()
            return True, 0.0
        if not restarting:
            return False, 0.0
        self.in_a_row += 1
        delay = restart_delay(self.in_a_row)
        if delay:
            self.hold_until = max(self.hold_until or 0.0, now + delay)
        return False, delay

    def stable(self) -> None:
        """A worker stayed up ``min_uptime`` after ready: starts work again."""
        self.in_a_row = 0

    def reset(self) -> None:
        """After a crash loop: the cluster stops, or goes back to the workers it had."""
        self.recent.clear()
        self.in_a_row = 0
        self.hold_until = None

    def held(self, now: float) -> bool:
        """True while starts wait (back-off); False once the wait is over (and forgotten)."""
        if self.hold_until is not None and now >= self.hold_until:
            self.hold_until = None
        return self.hold_until is not None
