"""Client-side request-rate limit and retry backoff for the teacher client."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time


class RateLimiter:
    """At most `rate_per_s` request starts per second, spaced evenly (no bursts: hosted APIs count per second).

    Each caller reserves the next free slot under a lock and sleeps outside it, so waiting callers queue in order.
    """

    def __init__(self, rate_per_s: float | None) -> None:
        self.interval_s = 0.0 if rate_per_s is None else 1.0 / rate_per_s
        self._next_s = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if self.interval_s == 0.0:
            return
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next_s)
            self._next_s = start + self.interval_s
        if start > now:
            await asyncio.sleep(start - now)


def backoff_delay(attempt: int, *, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with "full jitter": uniform in [0, min(max_s, base_s * 2**attempt)].

    Full jitter spreads the retries of many concurrent rollouts that failed together (one 503 burst) instead of
    sending them back in lock step. `attempt` counts from 0 (the first retry).
    """
    return rng.uniform(0.0, min(max_s, base_s * (2.0**attempt)))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds (fractions accepted) or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):  # neither a number nor a date: ignore it, fall back to our backoff
        return None
    return max(0.0, parsed.timestamp() - time.time())
