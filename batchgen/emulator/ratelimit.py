"""The emulator's per-key rate limit, and the meter that proves a client kept to its own.

All of it works on real (monotonic) time, never the emulated clock: a client's request budget is a real
rate. Two shapes of limit, both with the same `check(key)`:

* `SlidingWindowLimiter` (the default): at most `rate` accepted requests in any rolling second, so a
  client that never sends more than its rate in any one second (what `max_requests_in_1s` measures)
  never sees a 429;
* `TokenBucketLimiter` (`rate_limit_burst` set): a bucket of `burst` tokens refilled at `rate` per second,
  one token per accepted request — what most API gateways run. A client pacing evenly at the rate with a
  burst of its own no larger than the server's never sees a 429; a client that starts with a second's
  worth of requests at once does.

Rejected requests use up neither, so a client that backs off gets through. Each key has its own window or
bucket; `PerKeyLimiter` gives a key its own rate (the scenario's `accounts`, issue 15) over the shared one.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Protocol


class SlidingWindowLimiter:
    def __init__(self, rate_per_s: float) -> None:
        # A rate below 1/s is one request per 1/rate seconds; otherwise floor(rate) per second.
        self.window_s = max(1.0, 1.0 / rate_per_s)
        self.capacity = max(1, math.floor(rate_per_s * self.window_s + 1e-9))
        self._seen: dict[str, deque[float]] = {}

    def check(self, key: str, now: float | None = None) -> float | None:
        """None if the request may go ahead (and counts it), else seconds until a slot frees."""
        now = time.monotonic() if now is None else now
        window = self._seen.get(key)
        if window is None:
            window = self._seen[key] = deque()
        edge = now - self.window_s
        while window and window[0] <= edge:
            window.popleft()
        if len(window) >= self.capacity:
            return max(0.001, window[0] - edge)
        window.append(now)
        return None


class TokenBucketLimiter:
    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when last refilled)

    def check(self, key: str, now: float | None = None) -> float | None:
        """None if the request may go ahead (and takes a token), else seconds until a token is back."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0 - 1e-9:  # (float sums of exact intervals land a hair under 1)
            self._buckets[key] = (max(0.0, tokens - 1.0), now)
            return None
        self._buckets[key] = (tokens, now)
        return max(0.001, (1.0 - tokens) / self.rate)


class Limiter(Protocol):
    def check(self, key: str, now: float | None = None) -> float | None: ...


class PerKeyLimiter:
    """Keys with their own limiter (an account's own rate), the rest under the shared one (None: unlimited)."""

    def __init__(self, shared: Limiter | None, own: Mapping[str, Limiter]) -> None:
        self.shared = shared
        self.own = dict(own)

    def check(self, key: str, now: float | None = None) -> float | None:
        limiter = self.own.get(key, self.shared)
        return None if limiter is None else limiter.check(key, now)


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
