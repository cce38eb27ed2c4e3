"""AdaptiveLimiter on a controlled clock: the loop's `time()` is patched (as aiolimiter's own tests do), so
every assertion is about counts, order and rates at given instants, never about wall-clock durations.

The control loop is tested against a scripted server: a token bucket (burst 10, like the benchmarks'
emulator) whose limit can change mid-run, answering each call at once with 2xx or 429 + Retry-After."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Callable

import pytest

from batchgen.engine.ratelimit import POLL, SUBMIT, AdaptiveLimiter, Lane
from batchgen.units import Rate, parse_rate


class FakeClock:
    """Freezes the running loop's clock; `advance()` moves it and lets every ready task run."""

    def __init__(self, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(loop, "time", lambda: self.now)

    async def advance(self, seconds: float, rounds: int = 300) -> None:
        self.now += seconds
        await settle(rounds)


async def settle(rounds: int = 300) -> None:
    """Let the loop run everything that is ready at the current (frozen) instant."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeClock]:
    yield FakeClock(asyncio.get_running_loop(), monkeypatch)


def quiet(rate: Rate, **kwargs: object) -> AdaptiveLimiter:
    """A limiter whose cool-down jitter is seeded (so pauses are reproducible)."""
    return AdaptiveLimiter(rate, rng=random.Random(1), **kwargs)  # type: ignore[arg-type]


class Waiters:
    """Tasks that each acquire once, recording the order and the (fake) time they got through."""

    def __init__(self, limiter: AdaptiveLimiter, clock: FakeClock) -> None:
        self.limiter, self.clock = limiter, clock
        self.done: list[tuple[int, float]] = []
        self.lanes: list[Lane] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, count: int, lane: Lane = SUBMIT) -> None:
        for _ in range(count):
            self.tasks.append(asyncio.create_task(self._one(len(self.tasks), lane)))

    async def _one(self, index: int, lane: Lane) -> None:
        await self.limiter.acquire(lane)
        self.done.append((index, self.clock.now))
        self.lanes.append(lane)

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()

    @property
    def count(self) -> int:
        return len(self.done)


# --- pacing -----------------------------------------------------------------------------------------


async def test_no_start_burst_even_spacing_from_the_first_call(clock: FakeClock) -> None:
    limiter = quiet(parse_rate("100/s"))
    assert limiter.burst == 4  # a few calls, not a second's worth
    waiters = Waiters(limiter, clock)
    waiters.start(300)
    await settle()
    assert waiters.count == 4
    for tenth in range(1, 11):
        for _ in range(10):
            await clock.advance(0.01, rounds=30)
        assert waiters.count == pytest.approx(4 + 10 * tenth, abs=1)
    waiters.cancel()


async def test_slow_rate_burst_is_one_call(clock: FakeClock) -> None:
    limiter = quiet(Rate(30, 60))  # 0.5/s
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


@pytest.mark.parametrize("rate", [Rate(8, 1), Rate(2, 1), Rate(90, 60), Rate(100, 1)])
async def test_one_second_windows_never_exceed_rate_plus_burst_under_feedback(clock: FakeClock, rate: Rate) -> None:
    """Penalties and rewards at random moments never open the bucket beyond the configured bound (at low
    effective rates a call pays in several chunks; that must not bunch calls up either)."""
    limiter = AdaptiveLimiter(rate, rng=random.Random(3))
    rng = random.Random(7)
    released: list[float] = []

    async def worker(lane: Lane) -> None:
        while True:
            await limiter.acquire(lane)
            released.append(clock.now)

    tasks = [asyncio.create_task(worker(POLL if i % 3 else SUBMIT)) for i in range(30)]
    for _ in range(400):
        await clock.advance(0.05, rounds=60)
        roll = rng.random()
        if roll < 0.03:
            limiter.penalize(rng.choice([None, 0.0, 0.3, 1.0]))
        elif roll < 0.6:
            limiter.reward()
    for task in tasks:
        task.cancel()
    assert len(released) > 10
    assert limiter.throttles > 0
    bound = rate.per_second + limiter.burst
    for start in released:
        assert sum(1 for t in released if start <= t < start + 1.0) <= bound


# --- lanes ------------------------------------------------------------------------------------------


async def test_polls_go_first_but_submissions_keep_a_share(clock: FakeClock) -> None:
    limiter = quiet(Rate(10, 1), burst=1, poll_grace_s=0.0)
    await limiter.acquire(SUBMIT)  # the bucket is full now: everything below queues
    waiters = Waiters(limiter, clock)
    waiters.start(20, SUBMIT)
    waiters.start(20, POLL)
    await settle()
    for _ in range(20):
        await clock.advance(0.1)
    assert waiters.count == 20
    # The first submission had already taken the turn; after it polls lead, three at a time, then one
    # submission: the submissions' reserved share of the budget.
    assert waiters.lanes[:9] == [SUBMIT, POLL, POLL, POLL, SUBMIT, POLL, POLL, POLL, SUBMIT]
    assert waiters.lanes.count(SUBMIT) >= 20 // 4
    waiters.cancel()


async def test_a_poll_waits_its_grace_then_goes_before_queued_submissions(clock: FakeClock) -> None:
    limiter = quiet(Rate(10, 1), burst=1, poll_grace_s=0.5)
    await limiter.acquire(SUBMIT)
    waiters = Waiters(limiter, clock)
    waiters.start(20, SUBMIT)
    await settle()
    for _ in range(3):
        await clock.advance(0.1)
    assert waiters.lanes == [SUBMIT] * 3
    waiters.start(1, POLL)
    await settle()
    for _ in range(10):
        await clock.advance(0.1)
    # In arrival order for its first half second (so the next batch poll can fill up), then ahead of
    # the 16 submissions still queued before it: the sixth call after it arrived at the latest.
    assert POLL in waiters.lanes
    assert 3 + 4 <= waiters.lanes.index(POLL) <= 3 + 6, waiters.lanes
    waiters.cancel()


async def test_the_default_grace_is_the_time_of_a_full_batch_of_calls(clock: FakeClock) -> None:
    """At 10 calls/s a poll waits its place for 5 s (50 calls: the next batch poll fills meanwhile)."""
    limiter = quiet(Rate(10, 1), burst=1)
    await limiter.acquire(SUBMIT)
    waiters = Waiters(limiter, clock)
    waiters.start(80, SUBMIT)
    await settle()
    waiters.start(1, POLL)
    await settle()
    for _ in range(70):
        await clock.advance(0.1, rounds=40)
    assert 48 <= waiters.lanes.index(POLL) <= 52, waiters.lanes.index(POLL)
    waiters.cancel()


async def test_a_poll_goes_at_once_when_nothing_else_waits(clock: FakeClock) -> None:
    limiter = quiet(Rate(10, 1), burst=2)
    waiters = Waiters(limiter, clock)
    waiters.start(1, POLL)
    await settle()
    assert waiters.count == 1


async def test_a_cancelled_waiter_gives_up_its_place(clock: FakeClock) -> None:
    limiter = quiet(Rate(10, 1), burst=1)
    await limiter.acquire()
    waiters = Waiters(limiter, clock)
    waiters.start(3)
    await settle()
    waiters.tasks[0].cancel()
    for _ in range(4):
        await clock.advance(0.1)
    assert [i for i, _ in waiters.done] == [1, 2]


def test_unknown_lane_is_refused() -> None:
    limiter = AdaptiveLimiter(Rate(5, 1))
    with pytest.raises(ValueError, match="lane"):
        asyncio.run(limiter.acquire("download"))  # type: ignore[arg-type]


# --- cool-downs -------------------------------------------------------------------------------------


async def test_a_429_pauses_every_call_until_retry_after_plus_positive_jitter(clock: FakeClock) -> None:
    limiter = quiet(Rate(10, 1), poll_grace_s=0.5)
    limiter.penalize(3.0)
    pause = limiter.pause_remaining_s()
    assert 3.0 <= pause <= 3.3  # never earlier than the server asked, at most 10% later
    assert limiter.throttles == 1
    waiters = Waiters(limiter, clock)
    waiters.start(5, SUBMIT)
    waiters.start(2, POLL)
    await settle()
    await clock.advance(pause - 0.01)
    assert waiters.count == 0
    # Nothing was accepted before that 429, so there is nothing to measure: the rate halves (5/s).
    assert limiter.effective_rate == pytest.approx(5.0)
    for _ in range(22):
        await clock.advance(0.01, rounds=30)
    assert waiters.count >= 1
    for _ in range(20):
        await clock.advance(0.1)
    assert waiters.count == 7
    # The first had the turn; then the polls, which have waited the whole cool-down, go first.
    assert waiters.lanes[1:3] == [POLL, POLL]


async def test_jitter_spreads_cool_downs_but_only_upwards(clock: FakeClock) -> None:
    pauses = []
    for seed in range(20):
        limiter = AdaptiveLimiter(Rate(10, 1), rng=random.Random(seed))
        limiter.penalize(2.0)
        pauses.append(limiter.pause_remaining_s())
    assert min(pauses) >= 2.0 and max(pauses) <= 2.2
    assert len({round(p, 6) for p in pauses}) > 10


async def test_without_retry_after_the_default_cool_down_applies(clock: FakeClock) -> None:
    limiter = quiet(Rate(5, 1), default_pause_s=4.0)
    limiter.penalize(None)
    assert 4.0 <= limiter.pause_remaining_s() <= 4.4


async def test_payments_made_before_a_cool_down_are_forfeited(clock: FakeClock) -> None:
    """At a fifth of the configured 1/s a call pays five 1-unit chunks. Calls that paid part of their
    cost before a 429 start over after the cool-down, not the instant it ends."""
    limiter = quiet(Rate(1, 1), min_fraction=0.2)
    for _ in range(3):
        await clock.advance(0.6)
        limiter.penalize(0.0)  # refusals with nothing accepted: each halves the rate, down to the floor
    await clock.advance(2.0)
    assert limiter.effective_rate == pytest.approx(0.2)
    waiters = Waiters(limiter, clock)
    waiters.start(3)
    await clock.advance(3.0)
    before = waiters.count
    assert before <= 1
    limiter.penalize(4.0)
    await clock.advance(4.5)
    assert waiters.count == before  # nobody leaves on what they paid before the cool-down
    waiters.cancel()


# --- the control loop against a scripted server ------------------------------------------------------


class ScriptedServer:
    """A token bucket (burst 10) whose limit follows `limit(t)`; answers each call at once."""

    def __init__(self, clock: FakeClock, limit: Callable[[float], float], burst: float = 10.0) -> None:
        self.clock, self.limit, self.burst = clock, limit, burst
        self.start = clock.now
        self.tokens = burst
        self.last = clock.now
        self.ok: list[float] = []  # seconds since start of each accepted call
        self.refused: list[float] = []
        self.refuse_all_until = -1.0
        self.refuse_next = False

    def answer(self) -> float | None:
        """None for a 2xx, else the Retry-After (seconds until a token is back)."""
        now = self.clock.now
        t = now - self.start
        rate = self.limit(t)
        self.tokens = min(self.burst, self.tokens + (now - self.last) * rate)
        self.last = now
        if t < self.refuse_all_until or self.refuse_next:
            self.refuse_next = False
            self.refused.append(t)
            return 0.5
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.ok.append(t)
            return None
        self.refused.append(t)
        return (1.0 - self.tokens) / rate

    def accepted_per_s(self, start: float, end: float) -> float:
        return sum(1 for t in self.ok if start <= t < end) / (end - start)

    def share_refused(self, start: float = 0.0, end: float = math.inf) -> float:
        ok = sum(1 for t in self.ok if start <= t < end)
        bad = sum(1 for t in self.refused if start <= t < end)
        return bad / max(1, ok + bad)


async def drive(limiter: AdaptiveLimiter, server: ScriptedServer, clock: FakeClock, seconds: float,
                *, workers: int = 20, step: float = 0.01,
                every: Callable[[float], None] | None = None) -> list[tuple[float, float]]:
    """Workers that always have work: acquire, ask the server, report back. Returns (t, effective rate)."""

    async def worker() -> None:
        while True:
            await limiter.acquire(SUBMIT)
            retry_after = server.answer()
            if retry_after is None:
                limiter.reward()
            else:
                limiter.penalize(retry_after)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    trace = []
    try:
        for i in range(int(seconds / step)):
            await clock.advance(step, rounds=12)
            t = clock.now - server.start
            if every is not None:
                every(t)
            if i % 10 == 0:
                trace.append((t, limiter.effective_rate))
    finally:
        for task in tasks:
            task.cancel()
        await settle(50)
    return trace


def rates_between(trace: list[tuple[float, float]], start: float, end: float) -> list[float]:
    return [rate for t, rate in trace if start <= t < end]


async def test_rate_equal_to_the_server_limit_is_held_without_429s(clock: FakeClock) -> None:
    limiter = quiet(Rate(100, 1))
    server = ScriptedServer(clock, lambda t: 100.0)
    trace = await drive(limiter, server, clock, 10.0)
    assert server.refused == []
    assert min(rates_between(trace, 0, 10)) == pytest.approx(100.0)
    assert server.accepted_per_s(1, 10) >= 97


async def test_four_times_the_server_limit_settles_at_it_with_few_429s(clock: FakeClock) -> None:
    limiter = quiet(Rate(40, 1))
    server = ScriptedServer(clock, lambda t: 10.0)
    trace = await drive(limiter, server, clock, 60.0)
    assert server.share_refused() <= 0.05, (len(server.refused), len(server.ok))
    settled = rates_between(trace, 10, 60)
    assert min(settled) >= 8.5 and max(settled) <= 12.5, (min(settled), max(settled))
    assert server.accepted_per_s(10, 60) >= 0.9 * 10
    assert limiter.learned_limit == pytest.approx(10, rel=0.2)
    assert limiter.throttles == len(server.refused)


async def test_a_limit_that_changes_mid_run_is_found_again_both_ways(clock: FakeClock) -> None:
    limiter = quiet(Rate(40, 1))
    server = ScriptedServer(clock, lambda t: 20.0 if t < 30 or t >= 60 else 10.0)
    trace = await drive(limiter, server, clock, 110.0)
    assert 17 <= sum(rates_between(trace, 20, 30)) / len(rates_between(trace, 20, 30)) <= 23
    lowered = rates_between(trace, 40, 60)
    assert min(lowered) >= 8.5 and max(lowered) <= 12.5
    # The learned 10/s decays: the raised limit is found again within about half a minute.
    assert server.accepted_per_s(95, 110) >= 0.85 * 20
    assert server.share_refused() <= 0.05


async def test_an_isolated_429_costs_a_small_step_not_a_collapse(clock: FakeClock) -> None:
    limiter = quiet(Rate(50, 1))
    server = ScriptedServer(clock, lambda t: 1000.0)
    injected = []

    def one_refusal(t: float) -> None:
        if not injected and t >= 10.0:
            injected.append(t)
            server.refuse_next = True
            before.append(limiter.effective_rate)

    before: list[float] = []
    trace = await drive(limiter, server, clock, 20.0, every=one_refusal)
    assert len(server.refused) == 1
    after = rates_between(trace, 10.0, 20.0)
    assert before == [pytest.approx(50.0)]
    assert min(after) >= 0.95 * 50  # 3% off, then climbing back
    assert after[-1] == pytest.approx(50.0)
    assert server.accepted_per_s(5, 20) >= 0.95 * 50


async def test_a_429_while_sending_far_below_the_rate_is_not_taken_for_the_limit(clock: FakeClock) -> None:
    """Start-up: the run sends 20 calls/s of its 100/s (claims, new connections), a bunch of them meets the
    server's burst limit. The rate it was sending at says nothing about the server's limit."""
    limiter = quiet(Rate(100, 1))
    for _ in range(20):
        await clock.advance(0.05)
        limiter.reward()
    limiter.penalize(0.01)
    assert limiter.effective_rate == pytest.approx(97.0)
    assert limiter.learned_limit is None


async def test_a_429_storm_cuts_to_the_floor_then_climbs_back_fast(clock: FakeClock) -> None:
    limiter = quiet(Rate(50, 1))
    server = ScriptedServer(clock, lambda t: 1000.0)

    def storm(t: float) -> None:
        if 5.0 <= t < 5.02:
            server.refuse_all_until = 8.0  # three seconds of nothing but 429s (Retry-After 0.5 s)

    trace = await drive(limiter, server, clock, 25.0, every=storm)
    storm_rates = rates_between(trace, 6.0, 8.0)
    assert min(storm_rates) <= 0.2 * 50  # it did not keep hammering
    # A storm sends few calls: each cool-down holds everything, and the cut goes to what was accepted.
    assert len(server.refused) <= 15
    # Multiplicative climb once the server answers again: back at the ceiling well within 15 s.
    assert rates_between(trace, 20.0, 25.0)[0] == pytest.approx(50.0)


async def test_set_ceiling_lowers_the_hard_limit_at_run_time_never_above_configured(clock: FakeClock) -> None:
    limiter = quiet(Rate(40, 1))
    limiter.set_ceiling(10.0)
    assert (limiter.ceiling, limiter.effective_rate) == (10.0, 10.0)
    server = ScriptedServer(clock, lambda t: 1000.0)
    await drive(limiter, server, clock, 5.0)
    # (At 10 ms clock steps a call leaves up to a step late, and a bucket of one call's cost cannot make
    # that up: a little under 10/s here; what matters is that it is not above.)
    assert 8.5 <= server.accepted_per_s(1, 5) <= 10.5
    limiter.set_ceiling(400.0)  # a share larger than the whole: capped at --rate
    assert limiter.ceiling == 40.0
    await drive(limiter, server, clock, 10.0)
    assert limiter.effective_rate == pytest.approx(40.0)
    with pytest.raises(ValueError):
        limiter.set_ceiling(0)


async def test_snapshot_reports_what_a_run_shows(clock: FakeClock) -> None:
    limiter = quiet(Rate(20, 1))
    for _ in range(30):
        limiter.reward()
        await clock.advance(0.05)
    limiter.penalize(0.1)
    snap = limiter.snapshot()
    assert snap["configured_rate"] == 20 and snap["throttles"] == 1 and snap["burst"] == 2
    assert snap["learned_limit"] is not None and snap["effective_rate"] < 20


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        AdaptiveLimiter(Rate(5, 1), min_fraction=0)
    with pytest.raises(ValueError):
        AdaptiveLimiter(Rate(5, 1), polls_per_submit=0)
    with pytest.raises(ValueError):
        AdaptiveLimiter(Rate(5, 1), burst=0.5)
