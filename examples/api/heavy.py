"""The CPU-heavy part of the service, in its own module so that pool workers can import it."""

from __future__ import annotations

from math import isqrt


def count_primes(limit: int) -> int:
    """How many primes are below ``limit``, by trial division: pure-Python CPU work, on purpose
    (about 0.1 s for 60 000 on a 2020s core)."""
    count = 0
    for candidate in range(2, limit):
        for divisor in range(2, isqrt(candidate) + 1):
            if candidate % divisor == 0:
                break
        else:
            count += 1
    return count
