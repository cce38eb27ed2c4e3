"""An aiolimiter bucket that slows the whole run down when the server says 429, and speeds up again slowly.

Evolink documents no numeric rate limit, so batchgen sends at the rate the user configured and lets the
server correct it. `AdaptiveLimiter` is shared by every API call of a run (submits, polls, uploads; not
result downloads, which go to a media host):

* `acquire()` waits for a slot. The pacing is an `aiolimiter.AsyncLimiter` at the configured rate, never a
  hand-written bucket.
* `penalize(retry_after_s)` is called by the client on every 429. It pauses **all** acquisitions until the
  server's Retry-After has passed (or `default_pause_s` when it gave none), and lowers the effective rate
  multiplicatively (×`backoff_factor`, at most once per `decrease_cooldown_s`, floored at `min_fraction` of
  the configured rate). The cool-down matters: requests already in flight when the first 429 arrives come
  back as a burst of 429s, and they all describe the old rate, not the new one; lowering once per burst is
  the TCP-style reading of "one congestion signal".
* `reward()` is called on every 2xx. It raises the rate additively, by `recovery_per_s` of the configured
  rate per second of clean traffic since the last penalty, up to the configured rate and never above it.
  Time in a pause does not count, nor do successes that arrive during it; an idle gap between two
  successes counts as at most one second (or two request intervals, at rates below 2/s).

How a lower rate is enforced — one bucket, costlier requests
-------------------------------------------------------------
There is exactly one `AsyncLimiter`, created once at the configured rate, in units where a request at full
speed costs one unit. At a lower effective rate `r` a request costs `configured / r` units, paid in chunks no
larger than the bucket's capacity. Its fields are never changed and it is never swapped, so there is no
private state to patch and no window in which two buckets both let requests through. Requests pay one at a
time (first come, first served), each paying its whole cost after the one before it has left, and every
cost is at least one unit of a bucket that leaks at the configured rate; so no rate change can let more
than the configured rate plus the burst through in any one second (rounded up to whole requests); a lower
rate just makes each request pay more. The cost is re-read while a request pays, so a reward helps the
request that is paying; a penalty forfeits what it has paid (it starts again after the pause), so a
request held up by a pause cannot leave on credit earned before the 429.

Burst
-----
aiolimiter lets `max_rate` acquisitions through at once, so `AsyncLimiter(300, 60)` would allow 300
requests in the first instant. The bucket is instead sized to one second's worth of the configured rate
(at least one request): 300/min becomes `AsyncLimiter(5, 1)`, 0.5/s becomes `AsyncLimiter(1, 2)`. The
highest one-second count the server can see is then the configured per-second rate plus that burst.

All timing is on the running loop's clock (`loop.time()`, `loop.call_at`), as aiolimiter's own is, so
tests control time by patching the loop's `time`; create the limiter inside the run, and use it in one loop.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from aiolimiter import AsyncLimiter

from batchgen.units import Rate

_EPSILON = 1e-9


class AdaptiveLimiter:
    """Rate limiter shared by all API calls of a run; see the module docstring for the behaviour.

    :param rate: the configured rate (the ceiling; the limiter never goes above it).
    :param min_fraction: the effective rate never drops below this fraction of the configured rate.
    :param backoff_factor: each penalty multiplies the effective rate by this.
    :param recovery_per_s: fraction of the configured rate regained per second of clean traffic.
    :param default_pause_s: pause after a 429 that carried no Retry-After.
    :param decrease_cooldown_s: penalties closer together than this lower the rate only once.
    """

    def __init__(
        self,
        rate: Rate,
        *,
        min_fraction: float = 0.1,
        backoff_factor: float = 0.7,
        recovery_per_s: float = 0.05,
        default_pause_s: float = 2.0,
        decrease_cooldown_s: float = 1.0,
    ) -> None:
        if not 0 < min_fraction <= 1:
            raise ValueError("min_fraction must be in (0, 1]")
        if not 0 < backoff_factor <= 1:
            raise ValueError("backoff_factor must be in (0, 1]")
        self._configured = rate
        self._full_rate = rate.per_second
        self._min_rate = self._full_rate * min_fraction
        self._backoff_factor = backoff_factor
        self._recovery_per_s = recovery_per_s
        self._default_pause_s = default_pause_s
        self._decrease_cooldown_s = decrease_cooldown_s
        # One second's worth of the configured rate, and at least one whole request.
        capacity = max(1.0, self._full_rate)
        self._bucket = AsyncLimiter(capacity, capacity / self._full_rate)
        self._rate = self._full_rate
        self._paused_until = 0.0  # loop time before which nothing is released
        # Set while not paused. Waiters queue on this one Event rather than each sleeping until the pause
        # ends, so they resume in the order they arrived (timers due at the same instant have no order).
        self._running = asyncio.Event()
        self._running.set()
        self._resume_handle: asyncio.TimerHandle | None = None
        self._paying = asyncio.Lock()
        self._pause_epoch = 0  # bumped by every penalty: payments made before it are forfeited
        self._last_decrease_at: float | None = None
        self._recover_from = 0.0  # loop time from which clean traffic counts towards recovery
        self.penalties = 0  #: how many 429s were reported (every one, even those inside a cool-down)

    # --- what callers read ------------------------------------------------------------------------

    @property
    def configured(self) -> Rate:
        """The configured rate: the ceiling the limiter recovers to."""
        return self._configured

    @property
    def current_rate(self) -> float:
        """The effective rate now, in requests per second."""
        return self._rate

    @property
    def burst(self) -> float:
        """How many requests may leave at once at the configured rate (one second's worth, at least 1)."""
        return self._bucket.max_rate

    def pause_remaining_s(self) -> float:
        """Seconds until a 429's pause ends (0 when not paused)."""
        return max(0.0, self._paused_until - asyncio.get_running_loop().time())

    def __repr__(self) -> str:
        return (
            f"<AdaptiveLimiter configured={self._configured} current={self._rate:.3g}/s "
            f"penalties={self.penalties}>"
        )

    # --- acquiring --------------------------------------------------------------------------------

    async def acquire(self) -> None:
        """Wait until one request may be sent (after any pause, at the effective rate)."""
        while True:
            while not self._running.is_set():
                await self._running.wait()
            # One request pays at a time. Interleaved payments would let many requests finish their
            # last (possibly tiny) chunks in the same instant; in turn, each finishes at least one chunk
            # after the one before it. asyncio.Lock is first come, first served.
            async with self._paying:
                if not self._running.is_set():
                    continue
                epoch = self._pause_epoch
                paid = 0.0
                # The cost is re-read after every chunk: a reward while paying makes the rest cheaper.
                while epoch == self._pause_epoch and paid < self._cost() - _EPSILON:
                    chunk = min(self._cost() - paid, self._bucket.max_rate)
                    await self._bucket.acquire(chunk)
                    paid += chunk
                if epoch == self._pause_epoch:
                    return
                # A 429 arrived while this request was paying: what it paid is forfeited.

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def _cost(self) -> float:
        """Bucket units one request costs at the effective rate (1 at the configured rate)."""
        return self._full_rate / self._rate

    # --- feedback from the client -----------------------------------------------------------------

    def penalize(self, retry_after_s: float | None) -> None:
        """A 429: pause everything for `retry_after_s` (or the default) and lower the effective rate."""
        now = asyncio.get_running_loop().time()
        self.penalties += 1
        pause_s = self._default_pause_s if retry_after_s is None else max(0.0, retry_after_s)
        self._paused_until = max(self._paused_until, now + pause_s)
        self._pause_epoch += 1
        self._running.clear()
        if self._resume_handle is not None:
            self._resume_handle.cancel()
        self._resume_handle = asyncio.get_running_loop().call_at(self._paused_until, self._resume)
        if self._last_decrease_at is None or now - self._last_decrease_at >= self._decrease_cooldown_s:
            self._rate = max(self._min_rate, self._rate * self._backoff_factor)
            self._last_decrease_at = now
        # Recovery starts over, and only once the pause is over.
        self._recover_from = max(self._recover_from, self._paused_until)

    def _resume(self) -> None:
        """The pause is over: release the waiters, in arrival order."""
        self._resume_handle = None
        self._running.set()

    def reward(self) -> None:
        """A 2xx: regain `recovery_per_s` of the configured rate per second of clean traffic."""
        now = asyncio.get_running_loop().time()
        if now <= self._recover_from:
            return  # still inside a pause, or a success that was in flight before the last penalty
        if self._rate >= self._full_rate:
            self._recover_from = now
            return
        # An idle gap is not evidence that the server copes: count at most two request intervals of it.
        clean_s = min(now - self._recover_from, max(1.0, 2.0 / self._rate))
        self._recover_from = now
        self._rate = min(self._full_rate, self._rate + self._recovery_per_s * self._full_rate * clean_s)
