"""The emulator's per-key rate limit, and the meter that proves a client kept to its own.

Both work on real (monotonic) time, never the emulated clock: a client's request budget is a real rate.
The limit is a sliding window — at most `rate` accepted requests in any rolling second — so a client that
never sends more than its rate in any one second (what `max_requests_in_1s` measures) never sees a 429.
Rejected requests do not use up the window, so a client that backs off gets through. Each key has its own
window; a key may have its own rate (the scenario's `accounts`), else the emulator-wide one applies.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping


def _window(rate_per_s: float) -> tuple[float, int]:
    # A rate below 1/s is one request per 1/rate seconds; otherwise floor(rate) per second.
    window_s = max(1.0, 1.0 / rate_per_s)
    return window_s, max(1, math.floor(rate_per_s * window_s + 1e-9))


class SlidingWindowLimiter:
    def __init__(self, rate_per_s: float | None, per_key: Mapping[str, float] | None = None) -> None:
        """`rate_per_s` for every key (None: unlimited) unless `per_key` gives a key its own rate."""
        self._default = _window(rate_per_s) if rate_per_s else None
        self._per_key = {key: _window(rate) for key, rate in (per_key or {}).items()}
        self._seen: dict[str, deque[float]] = {}

    def check(self, key: str, now: float | None = None) -> float | None:
        """None if the request may go ahead (and counts it), else seconds until a slot frees."""
        limit = self._per_key.get(key, self._default)
        if limit is None:
            return None
        window_s, capacity = limit
        now = time.monotonic() if now is None else now
        window = self._seen.get(key)
        if window is None:
            window = self._seen[key] = deque()
        edge = now - window_s
        while window and window[0] <= edge:
            window.popleft()
        if len(window) >= capacity:
            return max(0.001, window[0] - edge)
        window.append(now)
        return None


class RateMeter:
    """The highest number of requests seen in any one-second window."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self.peak = 0
        self._recent: deque[float] = deque()

    def hit(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        recent = self._recent
        recent.append(now)
        edge = now - self.window_s
        while recent[0] <= edge:
            recent.popleft()
        if len(recent) > self.peak:
            self.peak = len(recent)
