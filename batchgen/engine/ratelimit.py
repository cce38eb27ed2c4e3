"""The rate controller shared by every API call of a run: paces evenly, finds the server's real limit, holds it.

Evolink documents no numeric rate limit, so batchgen sends at most at the rate the user configured
(`--rate`, the hard ceiling) and lets the server's 429s tell it where the real limit is. One
`AdaptiveLimiter` serves every API call of a run (submits, polls, the credits check, the Files API; never
result downloads, which go to a media host). The client calls three methods:

* `acquire(lane)` waits for a slot. `lane` says what the call is for: `POLL` (task and batch polls) or
  `SUBMIT` (submissions, and everything else: credits, Files API);
* `penalize(retry_after_s)` on every 429;
* `reward()` on every 2xx.

Pacing: even from the first call
--------------------------------
The pacing is an `aiolimiter.AsyncLimiter` built once at the configured rate with a capacity of `burst`
requests (a few: a tenth of a second's worth, between 1 and 4). A leaky bucket that small is GCRA spacing
of 1/R with a tolerance of a few calls, so a server whose own bucket allows a small burst never sees a
spike, not even at the start (aiolimiter's usual `AsyncLimiter(R, 1)` would let R calls out in the first
instant). The bucket's fields are never changed and it is never swapped. At a lower effective rate `r` a
call costs `R / r` units, paid in chunks no larger than the capacity, one call at a time: every cost is at
least one unit of a bucket that leaks at R, so no rate change can let more than R plus the burst through
in any one second. A cost is re-read while it is paid (a reward helps the call that is paying); a 429
forfeits what was paid, so a call held up by a cool-down cannot leave on credit earned before it.

Polls first, submissions never starved
---------------------------------------
Calls take turns to pay, first come, first served, with two exceptions. A poll that has waited its grace
goes ahead of every waiting submission: a finished task is worth more than a new one, so it is collected
within the grace, not after the queue of submissions ahead of it (up to `concurrency` of them). And never
more than `polls_per_submit` polls in a row while a submission waits: that reserves a share of the budget
(1 in `polls_per_submit + 1`) for submissions.

The grace is the time of 50 calls at the effective rate (0.5 s at 100/s, 5 s at 10/s), between 0.25 s
and `poll_grace_max_s` (10 s at most; the runner passes the shortest poll interval, 3 s × time scale, so a
finished task is always collected within one poll interval; `poll_grace_s` fixes it instead). Why not
every poll first at once: let through at once, the poller sends a poll for every task or two that falls
due, and a call that collects one task costs the budget as much as a submission (measured: 924 poll calls
for 1,500 tasks at 100/s, a third of the budget). Held for the time of 50 calls, the batch fills up
meanwhile (up to 50 ids a call), because the poller takes its turn here first and chooses the ids only
when the turn comes (`get_tasks(..., paid=True)`). Choosing them before the wait put the tasks that fell
due during it in calls of their own: 282 poll calls for those 1,500 tasks, against 207 now.

The control loop
----------------
* **429**: every call waits out one shared cool-down: the server's Retry-After (seconds or an HTTP date,
  parsed by the client), or `default_pause_s`, plus a positive-only jitter (0 to 10%), so calls never
  resume as a herd and never earlier than the server asked. 429s that arrive within `hold_s` of the last
  cut are the same congestion event (calls already in flight) and only extend the cool-down.
* **The cut** is to what the server was actually accepting: the 2xx answers per second of sending
  (cool-downs left out) over the last `window_s` seconds, or since the previous cut if that is later,
  times 0.95 (so the server's bucket can refill a little). That rate also becomes the **learned limit**.
  With fewer than 5 answers since the previous cut there is nothing to measure (a storm of 429s, the very
  first call): the rate halves. An *isolated* 429 costs a small step instead, 3% off the effective rate:
  one that comes after at least 50 successes with at most 2% of the window's answers refused (the rate
  it came at is the learned limit), or one that comes while the calls were going out at under half the
  effective rate with at most 10% refused (start-up, a lull: a bunch of calls met the server's burst
  limit, the rate says nothing, and nothing is learned).
* **The climb**, per second of clean traffic after the cool-down: multiplicative (×1.5 per second) while
  the effective rate is below 90% of the target; then additive, 5% of the target per second, up to the
  target. The target is the learned limit, grown with the time since the last 429 as a cube
  (`learned × (1 + (t / forget_s)³)`: +1% after 2 s, +12.5% after 5 s, doubled after 10 s), and never
  above the ceiling. So the controller comes back to just under the limit it found, probes slowly above
  it, then faster and faster, and finds a server that raised its limit (or a first estimate that was
  too low) within seconds. An idle gap between two successes counts as at most one second (or two call
  intervals at low rates): idleness is no evidence that the server copes.
* `set_ceiling(per_second)` changes the hard ceiling at run time, never above the configured rate (a
  runner sharing one API key with others takes its share this way).

botocore's adaptive retry mode (a CUBIC controller whose ceiling is the *send* rate measured at the last
throttle, a fixed 0.7 cut of it, a token bucket filled at up to twice the measured send rate) was the
starting point; the differences are deliberate: the cut goes to the *accepted* rate, not a fraction of
the send rate, isolated throttles cost a small step, and the bucket's burst is a few calls.

All timing is on the running loop's clock (`loop.time()`, `loop.call_at`), as aiolimiter's own is, so
tests control time by patching the loop's `time`; create the limiter inside the run and use it in one loop.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from types import TracebackType
from typing import Any, Literal

from aiolimiter import AsyncLimiter

from batchgen.units import Rate

Lane = Literal["poll", "submit"]
POLL: Lane = "poll"  #: task polls and batch polls
SUBMIT: Lane = "submit"  #: submissions and every other API call (credits, Files API)

_EPSILON = 1e-9
_MAX_BURST = 4.0
# Control-loop constants (see the module docstring); named here so the docs and the code agree.
_CUT_MARGIN = 0.95  # a cut goes to 95% of the accepted rate
_ISOLATED_SHARE = 0.02  # a 429 is isolated when at most 2% of the window's answers were 429s...
_ISOLATED_MIN_OK = 50  # ...and at least this many successes came since the previous 429
_ISOLATED_STEP = 0.97  # what an isolated 429 costs
_MIN_EVIDENCE = 5  # fewer answers than this since the last cut: nothing to measure, halve instead
_SLACK = 0.5  # sending at under half the effective rate...
_SLACK_SHARE = 0.1  # ...with at most 10% of the window refused: the 429 is isolated too
_CLIMB_FACTOR_PER_S = 1.5  # multiplicative climb, per second of clean traffic
_NEAR_TARGET = 0.9  # below this share of the target the climb is multiplicative
_ADDITIVE_PER_S = 0.05  # near the target: this share of the target per second
_JITTER = 0.1  # positive-only jitter on a cool-down, as a share of it
_POLL_GRACE_CALLS = 50.0  # a poll's grace is the time of this many calls (a full batch poll's ids)...
_POLL_GRACE_MIN_S, _POLL_GRACE_MAX_S = 0.25, 10.0  # ...within these bounds


class AdaptiveLimiter:
    """Rate controller shared by all API calls of a run; see the module docstring for the behaviour.

    :param rate: the configured rate: the hard ceiling, never exceeded (plus `burst`).
    :param burst: calls that may leave at once (default: a tenth of a second's worth, 1 to 4).
    :param default_pause_s: cool-down after a 429 that carried no Retry-After.
    :param window_s: how far back the accepted rate is measured.
    :param hold_s: 429s within this long after a cut are the same event and do not cut again.
    :param forget_s: the learned limit doubles after this long without a 429.
    :param poll_grace_max_s: the longest a due poll is held back to fill its batch (the runner passes the
        shortest poll interval, × time scale, so a finished task is still seen within one poll interval).
    :param poll_grace_s: a poll that has waited this long goes ahead of waiting submissions (default: the
        time of 50 calls at the effective rate, 0.25 s to 10 s).
    :param polls_per_submit: most polls in a row while a submission waits.
    :param min_fraction: the effective rate never drops below this share of the configured rate.
    :param rng: random source for the cool-down's jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        rate: Rate,
        *,
        burst: float | None = None,
        default_pause_s: float = 1.0,
        window_s: float = 3.0,
        hold_s: float = 0.5,
        forget_s: float = 10.0,
        poll_grace_s: float | None = None,
        poll_grace_max_s: float = 10.0,
        polls_per_submit: int = 3,
        min_fraction: float = 0.02,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < min_fraction <= 1:
            raise ValueError("min_fraction must be in (0, 1]")
        if polls_per_submit < 1:
            raise ValueError("polls_per_submit must be at least 1")
        if burst is not None and burst < 1:
            raise ValueError("burst must be at least one call")
        self._configured = rate
        self._full_rate = rate.per_second
        self._ceiling = self._full_rate
        self._min_rate = self._full_rate * min_fraction
        capacity = burst if burst is not None else min(_MAX_BURST, max(1.0, round(self._full_rate / 10)))
        # Units: a call at the configured rate costs one; the bucket leaks R units a second.
        self._bucket = AsyncLimiter(capacity, capacity / self._full_rate)
        self._default_pause_s = default_pause_s
        self._window_s = window_s
        self._hold_s = hold_s
        self._forget_s = forget_s
        self._polls_per_submit = polls_per_submit
        self._poll_grace_s = poll_grace_s
        self._poll_grace_max_s = min(_POLL_GRACE_MAX_S, poll_grace_max_s)
        self._rng = rng or random.Random()
        self._rate = self._ceiling
        self._learned: float | None = None
        self._learned_at = 0.0
        self._ok_times: deque[float] = deque()  # loop times of the 2xx answers of the last window
        self._throttle_times: deque[float] = deque()  # and of its 429s
        self._pauses: deque[tuple[float, float]] = deque()  # cool-downs (start, end) that touch the window
        self._first_seen: float | None = None  # loop time of the first feedback (the window's start)
        self._paused_until = 0.0
        self._running = asyncio.Event()  # set while not cooling down
        self._running.set()
        self._resume_handle: asyncio.TimerHandle | None = None
        self._pause_epoch = 0  # bumped by every 429: payments made before it are forfeited
        self._react_after = 0.0  # loop time before which a 429 does not cut again
        self._climb_from = 0.0  # loop time from which clean traffic counts towards the climb
        self._last_cut_at: float | None = None  # loop time of the last cut
        self._ok_since_throttle = 0  # 2xx answers since the last 429
        # Turns: one call pays at a time; waiting calls queue by lane.
        self._turn_taken = False
        # Per lane: (loop time it arrived, its future), in arrival order.
        self._queues: dict[Lane, deque[tuple[float, asyncio.Future[None]]]] = {POLL: deque(), SUBMIT: deque()}
        self._polls_in_row = 0
        self._throttles = 0

    # --- what callers read ------------------------------------------------------------------------

    @property
    def configured(self) -> Rate:
        """The configured rate (`--rate`): no ceiling is ever above it."""
        return self._configured

    @property
    def configured_rate(self) -> float:
        """The configured rate in calls per second."""
        return self._full_rate

    @property
    def ceiling(self) -> float:
        """The hard ceiling now, in calls per second (the configured rate unless `set_ceiling` lowered it)."""
        return self._ceiling

    @property
    def effective_rate(self) -> float:
        """The rate calls are paced at now, in calls per second."""
        return self._rate

    @property
    def learned_limit(self) -> float | None:
        """The rate at which the server last answered 429 (calls per second), or None before any 429."""
        return self._learned

    @property
    def throttles(self) -> int:
        """How many 429s were reported (every one, even those inside a cool-down)."""
        return self._throttles

    @property
    def burst(self) -> float:
        """How many calls may leave at once (the bucket's capacity at the configured rate)."""
        return self._bucket.max_rate

    def pause_remaining_s(self) -> float:
        """Seconds until the current cool-down ends (0 when not cooling down)."""
        return max(0.0, self._paused_until - asyncio.get_running_loop().time())

    def snapshot(self) -> dict[str, Any]:
        """What a run shows: JSON-ready, rates rounded to 0.01 call/s."""
        return {
            "configured_rate": round(self._full_rate, 2),
            "ceiling": round(self._ceiling, 2),
            "effective_rate": round(self._rate, 2),
            "learned_limit": None if self._learned is None else round(self._learned, 2),
            "throttles": self.throttles,
            "burst": self.burst,
        }

    def __repr__(self) -> str:
        learned = "-" if self._learned is None else f"{self._learned:.3g}/s"
        return (f"<AdaptiveLimiter configured={self._configured} effective={self._rate:.3g}/s "
                f"learned={learned} throttles={self.throttles}>")

    # --- acquiring --------------------------------------------------------------------------------

    async def acquire(self, lane: Lane = SUBMIT) -> None:
        """Wait until one call of this lane may be sent (after any cool-down, at the effective rate)."""
        if lane not in self._queues:
            raise ValueError(f"unknown lane {lane!r}")
        await self._take_turn(lane)
        try:
            while True:
                while not self._running.is_set():
                    await self._running.wait()
                epoch = self._pause_epoch
                paid = 0.0
                # The cost is re-read after every chunk: a reward while paying makes the rest cheaper.
                while epoch == self._pause_epoch and paid < self._cost() - _EPSILON:
                    chunk = min(self._cost() - paid, self._bucket.max_rate)
                    await self._bucket.acquire(chunk)
                    paid += chunk
                if epoch == self._pause_epoch:
                    return
                # A 429 arrived while this call was paying: what it paid is forfeited.
        finally:
            self._pass_turn()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def _cost(self) -> float:
        """Bucket units one call costs at the effective rate (1 at the configured rate)."""
        return self._full_rate / self._rate

    async def _take_turn(self, lane: Lane) -> None:
        if not self._turn_taken and not any(self._queues.values()):
            self._turn_taken = True
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        entry = (loop.time(), waiter)
        self._queues[lane].append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._pass_turn()  # it was handed the turn just as it was cancelled: hand it on
            elif entry in self._queues[lane]:  # (a turn passing by may already have dropped it)
                self._queues[lane].remove(entry)
            raise

    def _pass_turn(self) -> None:
        """Hand the turn to the next waiter: in arrival order, but a poll that has waited `poll_grace_s`
        first, and a waiting submission at least every `polls_per_submit + 1` turns."""
        polls, submits = self._queues[POLL], self._queues[SUBMIT]
        now = asyncio.get_running_loop().time() if polls and submits else 0.0
        while polls or submits:
            if not submits:
                take_poll = True
            elif not polls or self._polls_in_row >= self._polls_per_submit:
                take_poll = False
            else:
                take_poll = now - polls[0][0] >= self._poll_grace() or polls[0][0] < submits[0][0]
            if take_poll:
                _, waiter = polls.popleft()
                self._polls_in_row += 1 if submits else 0
            else:
                _, waiter = submits.popleft()
                self._polls_in_row = 0
            if not waiter.done():
                waiter.set_result(None)  # the turn stays taken: it passes to this waiter
                return
        self._turn_taken = False
        self._polls_in_row = 0

    def _poll_grace(self) -> float:
        if self._poll_grace_s is not None:
            return self._poll_grace_s
        return min(self._poll_grace_max_s, max(_POLL_GRACE_MIN_S, _POLL_GRACE_CALLS / self._rate))

    # --- feedback from the client -----------------------------------------------------------------

    def penalize(self, retry_after_s: float | None) -> None:
        """A 429: one shared cool-down for every call; then, once per congestion event, a cut."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._throttles += 1
        self._forget_before(now)
        self._throttle_times.append(now)
        pause_s = self._default_pause_s if retry_after_s is None else max(0.0, retry_after_s)
        pause_s *= 1.0 + _JITTER * self._rng.random()  # positive only: never earlier than asked
        self._paused_until = max(self._paused_until, now + pause_s)
        if self._pauses and self._pauses[-1][1] >= now:
            self._pauses[-1] = (self._pauses[-1][0], self._paused_until)  # one cool-down, extended
        else:
            self._pauses.append((now, self._paused_until))
        self._pause_epoch += 1
        self._running.clear()
        if self._resume_handle is not None:
            self._resume_handle.cancel()
        self._resume_handle = loop.call_at(self._paused_until, self._resume)
        self._climb_from = max(self._climb_from, self._paused_until)
        ok_since_last, self._ok_since_throttle = self._ok_since_throttle, 0
        if now < self._react_after:
            return  # the same congestion event: calls that were already in flight
        first_cut = self._last_cut_at is None
        since = -math.inf if self._last_cut_at is None else self._last_cut_at
        self._react_after = max(self._paused_until, now + self._hold_s)
        self._last_cut_at = now
        ok, refused = len(self._ok_times), len(self._throttle_times)
        share = refused / (ok + refused)
        # Sending far below our own pace (start-up, a lull): the 429 is about a bunch of calls, not the rate.
        slack = self._send_rate(now) < _SLACK * self._rate
        if (ok_since_last >= _ISOLATED_MIN_OK and share <= _ISOLATED_SHARE) or (slack and share <= _SLACK_SHARE):
            # An isolated 429: step down a little. At full pace the rate it came at is about the limit.
            if not slack:
                self._learned = self._rate
            new_rate = self._rate * _ISOLATED_STEP
        elif sum(1 for t in self._ok_times if t > since) + sum(1 for t in self._throttle_times if t > since) \
                < _MIN_EVIDENCE:
            # Too few answers since the last cut to measure anything (a storm, or the very first call):
            # halve, and keep the learned limit.
            new_rate = self._rate * 0.5
        else:
            accepted = self._accepted_rate(now, since, first_cut)
            self._learned = max(self._min_rate, accepted)
            new_rate = min(self._rate, accepted * _CUT_MARGIN)
        if self._learned is not None:
            self._learned_at = now
        self._rate = min(self._ceiling, max(self._min_rate, new_rate))

    def reward(self) -> None:
        """A 2xx: counts towards the measured accepted rate and, after any cool-down, towards the climb."""
        now = asyncio.get_running_loop().time()
        self._forget_before(now)
        self._ok_times.append(now)
        self._ok_since_throttle += 1
        if now <= self._climb_from:
            return  # inside a cool-down, or an answer to a call sent before the last 429
        # An idle gap is not evidence that the server copes: count at most two call intervals of it.
        clean_s = min(now - self._climb_from, max(1.0, 2.0 / self._rate))
        self._climb_from = now
        target = self._target(now)
        if self._rate >= target:
            return
        if self._rate < _NEAR_TARGET * target:
            climbed = self._rate * _CLIMB_FACTOR_PER_S ** clean_s
        else:
            climbed = self._rate + _ADDITIVE_PER_S * target * clean_s
        self._rate = min(target, climbed)

    def set_ceiling(self, per_second: float) -> None:
        """Change the hard ceiling at run time; it is never above the configured rate."""
        if not per_second > 0:
            raise ValueError("a ceiling must be a positive rate")
        self._ceiling = min(self._full_rate, float(per_second))
        self._rate = min(self._rate, self._ceiling)

    # --- the control loop's arithmetic ------------------------------------------------------------

    def _target(self, now: float) -> float:
        """Where the climb heads: the learned limit, grown with time since it was learned; at most the ceiling."""
        if self._learned is None:
            return self._ceiling
        grown = self._learned * (1.0 + ((now - self._learned_at) / self._forget_s) ** 3)
        return min(self._ceiling, grown)

    def _accepted_rate(self, now: float, since: float, first_cut: bool) -> float:
        """2xx answers per second of sending, over the last window or since the last cut if that is later.

        Before the first cut the span is never under one second: a burst the server's own bucket allowed
        is not its sustained rate (after a cut that bucket is empty). Time spent cooling down is not
        sending time, so it is left out; otherwise every cut would also be a fixed fraction.
        """
        start = max(now - self._window_s, since, self._first_seen if self._first_seen is not None else now)
        span = now - start
        if first_cut:
            span = max(1.0, span)
            start = now - span
        cooling = sum(max(0.0, min(end, now) - max(begin, start)) for begin, end in self._pauses)
        ok = sum(1 for t in self._ok_times if t > start)
        return ok / max(0.25, span - cooling)

    def _send_rate(self, now: float) -> float:
        """Answers (2xx and 429) per second of sending over the last window: the pace the calls really
        went at, whatever the effective rate allowed."""
        start = max(now - self._window_s, self._first_seen if self._first_seen is not None else now)
        cooling = sum(max(0.0, min(end, now) - max(begin, start)) for begin, end in self._pauses)
        return (len(self._ok_times) + len(self._throttle_times)) / max(0.25, now - start - cooling)

    def _forget_before(self, now: float) -> None:
        if self._first_seen is None:
            self._first_seen = now
        edge = now - self._window_s
        for times in (self._ok_times, self._throttle_times):
            while times and times[0] <= edge:
                times.popleft()
        while self._pauses and self._pauses[0][1] <= edge:
            self._pauses.popleft()

    def _resume(self) -> None:
        """The cool-down is over: release the waiters (the one holding the turn first)."""
        self._resume_handle = None
        self._running.set()
