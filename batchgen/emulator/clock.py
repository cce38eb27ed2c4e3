"""Emulated time: one factor that shrinks every emulated duration.

The emulator never runs timers. A task's progress, a result URL's expiry and an upload's expiry are
worked out when someone asks, from timestamps on this clock. Timestamps are real wall-clock seconds
(so `created` and `expires_at` mean what a client thinks they mean); only *durations* are emulated:
an emulated 24 hours lasts `24 * 3600 * time_scale` real seconds. `advance()` moves the clock forward
for tests that want to jump past an expiry without waiting at all.
"""

from __future__ import annotations

import math
import time


class Clock:
    def __init__(self, time_scale: float) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be above zero")
        self.time_scale = time_scale
        self._offset_s = 0.0

    def now(self) -> float:
        """Wall-clock seconds, plus whatever `advance()` added."""
        return time.time() + self._offset_s

    def real_s(self, emulated_s: float) -> float:
        """How long an emulated duration lasts in real seconds."""
        return emulated_s * self.time_scale

    def advance(self, emulated_s: float) -> None:
        """Jump forward by an emulated duration (tests of expiry, without sleeping)."""
        self._offset_s += self.real_s(emulated_s)

    def report_s(self, real_s: float) -> int | float:
        """A duration as the API reports it (estimated_time, Retry-After).

        The reference types these as integer seconds, which is what an unscaled emulator sends. Scaled
        durations are often below one second, and rounding them would make a client poll in a tight loop
        or wait far too long, so with a time scale other than 1 they are fractional seconds (3 decimals).
        """
        real_s = max(0.0, real_s)
        if self.time_scale == 1.0:
            return math.ceil(real_s)
        return round(real_s, 3)
