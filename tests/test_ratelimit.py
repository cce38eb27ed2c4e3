"""AdaptiveLimiter on a controlled clock: the loop's `time()` is patched (as aiolimiter's own tests do), so
every assertion is about counts and order at given instants, never about wall-clock durations."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from batchgen.engine.ratelimit import AdaptiveLimiter
from batchgen.units import Rate, parse_rate


class FakeClock:
    """Freezes the running loop's clock; `advance()` moves it and lets every ready task run."""

    def __init__(self, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(loop, "time", lambda: self.now)

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        await settle()


async def settle(rounds: int = 300) -> None:
    """Let the loop run everything that is ready at the current (frozen) instant."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeClock]:
    yield FakeClock(asyncio.get_running_loop(), monkeypatch)


class Waiters:
    """Tasks that each acquire once, recording the order and the (fake) time they got through."""

    def __init__(self, limiter: AdaptiveLimiter, clock: FakeClock) -> None:
        self.limiter, self.clock = limiter, clock
        self.done: list[tuple[int, float]] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, count: int) -> None:
        for _ in range(count):
            self.tasks.append(asyncio.create_task(self._one(len(self.tasks))))

    async def _one(self, index: int) -> None:
        await self.limiter.acquire()
        self.done.append((index, self.clock.now))

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()

    @property
    def count(self) -> int:
        return len(self.done)


async def test_burst_is_one_seconds_worth_not_the_whole_period(clock: FakeClock) -> None:
    # aiolimiter's AsyncLimiter(300, 60) would let 300 through at once; ours lets one second's worth.
    limiter = AdaptiveLimiter(parse_rate("300/min"))
    assert limiter.burst == 5
    waiters = Waiters(limiter, clock)
    waiters.start(20)
    await settle()
    assert waiters.count == 5
    await clock.advance(1.0)
    assert waiters.count == 10
    await clock.advance(0.2)
    assert waiters.count == 11
    waiters.cancel()


async def test_slow_rate_burst_is_one_request(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(Rate(30, 60))  # 0.5/s
    assert limiter.burst == 1
    waiters = Waiters(limiter, clock)
    waiters.start(3)
    await settle()
    assert waiters.count == 1
    await clock.advance(1.0)
    assert waiters.count == 1
    await clock.advance(1.0)
    assert waiters.count == 2
    waiters.cancel()


async def test_penalize_pauses_every_acquisition_until_retry_after(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(Rate(10, 1))
    for _ in range(10):
        await limiter.acquire()  # the burst: the bucket is full now
    limiter.penalize(3.0)
    assert limiter.pause_remaining_s() == pytest.approx(3.0)
    assert limiter.penalties == 1
    assert limiter.current_rate == pytest.approx(7.0)
    waiters = Waiters(limiter, clock)
    waiters.start(5)
    await clock.advance(2.9)  # the bucket has long drained, but the pause holds
    assert waiters.count == 0
    await clock.advance(0.2)
    assert waiters.count == 5
    assert [i for i, _ in waiters.done] == [0, 1, 2, 3, 4]


async def test_penalize_without_retry_after_uses_the_default_pause(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(Rate(5, 1), default_pause_s=4.0)
    limiter.penalize(None)
    assert limiter.pause_remaining_s() == pytest.approx(4.0)
    waiters = Waiters(limiter, clock)
    waiters.start(1)
    await clock.advance(3.9)
    assert waiters.count == 0
    await clock.advance(0.2)
    assert waiters.count == 1


async def test_a_burst_of_429s_lowers_the_rate_once_and_the_floor_holds(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(Rate(10, 1), min_fraction=0.1)
    for _ in range(5):  # in-flight requests all coming back 429 at the same moment
        limiter.penalize(0.0)
    assert limiter.penalties == 5
    assert limiter.current_rate == pytest.approx(7.0)
    for _ in range(20):
        await clock.advance(1.0)
        limiter.penalize(0.0)
    assert limiter.current_rate == pytest.approx(1.0)  # 10% of the configured rate, no lower
    assert limiter.configured == Rate(10, 1)


async def test_lower_rate_paces_requests(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(Rate(10, 1), backoff_factor=0.5)
    limiter.penalize(0.0)
    assert limiter.current_rate == pytest.approx(5.0)
    waiters = Waiters(limiter, clock)
    waiters.start(40)
    await settle()
    assert waiters.count == 5  # the 10-unit bucket at 2 units a request
    for second in range(1, 4):
        await clock.advance(1.0)
        assert waiters.count == 5 + 5 * second
    waiters.cancel()


async def test_reward_recovers_gradually_after_the_pause_and_never_above_configured(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(Rate(10, 1), backoff_factor=0.5, recovery_per_s=0.05)
    limiter.penalize(1.0)
    assert limiter.current_rate == pytest.approx(5.0)
    await clock.advance(0.5)
    limiter.reward()  # a success that was in flight before the 429: no credit
    assert limiter.current_rate == pytest.approx(5.0)
    await clock.advance(1.5)  # 1 s of clean traffic after the pause
    limiter.reward()
    assert limiter.current_rate == pytest.approx(5.5)
    rates = []
    for _ in range(15):
        await clock.advance(1.0)
        limiter.reward()
        rates.append(limiter.current_rate)
    assert rates == sorted(rates)
    assert rates[-1] == pytest.approx(10.0)
    assert max(rates) <= 10.0


async def test_an_idle_gap_does_not_count_as_clean_traffic(clock: FakeClock) -> None:
    limiter = AdaptiveLimiter(Rate(10, 1), backoff_factor=0.5, recovery_per_s=0.05)
    limiter.penalize(0.0)
    await clock.advance(100.0)
    limiter.reward()
    assert limiter.current_rate == pytest.approx(5.5)  # at most one second's credit for the gap


async def test_payments_made_before_a_pause_are_forfeited(clock: FakeClock) -> None:
    """At half the configured 1/s a request pays two 1-unit chunks. Requests that paid part of their cost
    before a 429 must start over after the pause, not leave the instant it ends."""
    limiter = AdaptiveLimiter(Rate(1, 1), backoff_factor=0.5)
    limiter.penalize(0.0)
    await clock.advance(5.0)
    assert limiter.current_rate == pytest.approx(0.5)
    waiters = Waiters(limiter, clock)
    waiters.start(4)
    for _ in range(7):
        await clock.advance(0.5)
    before = waiters.count  # 4.5 units were available: at most two requests got their full two
    assert before <= 2
    limiter.penalize(5.0)  # now 0.35/s: 2.86 units a request, more than the 1-unit bucket holds
    await clock.advance(4.9)
    assert waiters.count == before
    await clock.advance(0.2)
    assert waiters.count == before  # nobody leaves on what they paid before the pause
    for _ in range(10):
        await clock.advance(1.0)
    assert before + 2 <= waiters.count <= before + 4  # 10 s at 0.35/s, paid from scratch after the pause
    waiters.cancel()


@pytest.mark.parametrize("rate", [Rate(8, 1), Rate(2, 1), Rate(90, 60)])
async def test_one_second_windows_never_exceed_rate_plus_burst_under_feedback(clock: FakeClock, rate: Rate) -> None:
    """Penalties and rewards at random moments never open the bucket beyond the configured bound (at low
    effective rates a request pays in several chunks; that must not bunch requests up either)."""
    limiter = AdaptiveLimiter(rate, recovery_per_s=0.1)
    rng = random.Random(7)
    released: list[float] = []

    async def worker() -> None:
        while True:
            await limiter.acquire()
            released.append(clock.now)

    tasks = [asyncio.create_task(worker()) for _ in range(30)]
    for _ in range(400):
        await clock.advance(0.05)
        roll = rng.random()
        if roll < 0.03:
            limiter.penalize(rng.choice([None, 0.0, 0.3, 1.0]))
        elif roll < 0.5:
            limiter.reward()
    for task in tasks:
        task.cancel()
    assert len(released) > 10
    assert limiter.penalties > 0
    bound = rate.per_second + limiter.burst
    for start in released:
        in_window = sum(1 for t in released if start <= t < start + 1.0)
        assert in_window <= bound


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        AdaptiveLimiter(Rate(5, 1), min_fraction=0)
    with pytest.raises(ValueError):
        AdaptiveLimiter(Rate(5, 1), backoff_factor=1.5)
