"""Scenario 2 — polls per image, with and without `estimated_time`, against the reference's fixed poller.

Polls spend the same request budget as submissions, so every needless poll slows the whole job down. The
reference's strategy (first poll after 3 s, then every 3-5 s) looks at a task about `1 + latency/4` times.
batchgen polls each task at the `estimated_time` the API gave it (plus a small margin) and asks for up to
50 tasks in one `POST /v1/tasks/batch` call; without `estimated_time` it falls back to the reference's
timing, still batched. Target: at most 1.3 polls per image when the API gives `estimated_time`.

Two figures per poller: **polls per image** (task look-ups: ids polled, singly or in a batch — what the
timing decides) and **poll requests per image** (HTTP calls — what the rate budget pays; batching divides
it). Both come from the emulator's own counters, not from the client.

Set-up: N = 200 one-image requests (`--quick`: 100) of the emulator's fastest model at time scale 1 — real
latencies (median 5 s, 2-20 s), because polling is about timing. No rate limit on the server and a client
rate of 1,000/s in every poller: under a shared request budget, polls queue behind submissions at the
limiter and leave later than the strategy asked, which flatters every strategy (a first try with R = 50/s
and N = 200 gave the fixed poller 1.18 polls per image instead of about 2). Concurrency 500. The baseline
is a tiny poller written here on `batchgen.api.client.EvolinkClient` (single `GET /v1/tasks/{id}` polls at
3 s, then uniform 3-5 s); it is not part of the engine. It ignores `estimated_time`, so it runs once,
against the emulator that reports it.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from batchgen import catalog
from batchgen.api.client import EvolinkClient
from batchgen.engine.ratelimit import AdaptiveLimiter
from batchgen.errors import ApiError
from batchgen.units import parse_rate
from benchmarks.harness import API_KEY, FAST_MODEL, Row, check, emulator, fresh_dir, median, run_batchgen, write_csv

RATE = 1000.0  # client side only: the server has no limit here (see above)
TIME_SCALE = 1.0
CONCURRENCY = 500
TARGET_POLLS = 1.3


def poll_counts(stats: dict[str, object]) -> tuple[int, int]:
    """(task look-ups, poll HTTP calls answered) from the emulator's counters."""
    by_route = stats["requests_by_route"]
    assert isinstance(by_route, dict)
    calls = sum(count for route, statuses in by_route.items() if "/v1/tasks" in route
                for status, count in statuses.items() if status != "429")
    polls = stats["polls"]
    assert isinstance(polls, int)
    return polls, calls


def batchgen_run(workdir: Path, n: int, estimated_time: bool) -> dict[str, float]:
    fresh_dir(workdir)
    manifest = write_csv(workdir / "polls.csv", n)
    with emulator(workdir, time_scale=TIME_SCALE, seed=2,
                  scenario={"estimated_time": estimated_time}) as emu:
        check(run_batchgen(manifest, emu, workdir, rate=f"{RATE:g}/s", concurrency=CONCURRENCY,
                           time_scale=TIME_SCALE, timeout_s=60 + 20 * n / RATE), "batchgen run")
        polls, calls = poll_counts(emu.stats())
    return {"polls": polls / n, "calls": calls / n}


async def _fixed_interval_poller(base_url: str, n: int, seed: int) -> None:
    """The reference's strategy: submit, wait 3 s, then poll every 3-5 s until the task is final."""
    rng = random.Random(seed)
    limiter = AdaptiveLimiter(parse_rate(f"{RATE:g}/s"))
    slots = asyncio.Semaphore(CONCURRENCY)
    lo, hi = catalog.POLL_INTERVAL_S

    async def call(fn: object, *args: object) -> object:
        for _ in range(100):  # bounded: a 429 waits for its Retry-After and tries again
            try:
                return await fn(*args)  # type: ignore[operator]
            except ApiError as error:
                if error.status != 429:
                    raise
                await asyncio.sleep(error.retry_after_s or 1.0)
        raise RuntimeError("gave up after 100 rate-limited tries")

    async def one(client: EvolinkClient, i: int) -> None:
        async with slots:
            body = {"prompt": f"Studio photo of product {i} (baseline), plain background", "model": FAST_MODEL,
                    "size": "1:1"}
            snap = await call(client.submit, body)
            task_id = snap.id  # type: ignore[attr-defined]
            await asyncio.sleep(catalog.POLL_INITIAL_WAIT_S * TIME_SCALE)
            for _ in range(1000):
                snap = await call(client.get_task, task_id)
                if snap.final:  # type: ignore[attr-defined]
                    return
                await asyncio.sleep(rng.uniform(lo, hi) * TIME_SCALE)

    async with EvolinkClient(base_url, base_url, API_KEY, limiter=limiter) as client:
        await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(n))), timeout=60 + 20 * n / RATE)


def baseline_run(workdir: Path, n: int, seed: int) -> dict[str, float]:
    fresh_dir(workdir)
    with emulator(workdir, time_scale=TIME_SCALE, seed=2) as emu:
        asyncio.run(_fixed_interval_poller(emu.base_url, n, seed))
        polls, calls = poll_counts(emu.stats())
    return {"polls": polls / n, "calls": calls / n}


def run(workdir: Path, *, quick: bool, runs: int) -> list[Row]:
    n = 100 if quick else 200
    with_est, without_est, base = [], [], []
    for i in range(runs):
        with_est.append(batchgen_run(workdir / f"est{i}", n, True))
        without_est.append(batchgen_run(workdir / f"noest{i}", n, False))
        base.append(baseline_run(workdir / f"base{i}", n, seed=i))

    def med(rs: list[dict[str, float]], key: str) -> float:
        return median([r[key] for r in rs])

    def runs_of(rs: list[dict[str, float]], key: str) -> list[float]:
        return [r[key] for r in rs]

    base_polls, base_calls = med(base, "polls"), med(base, "calls")
    polls = med(with_est, "polls")
    return [
        Row("2 polls", "polls/image, with estimated_time", polls, "", f"<= {TARGET_POLLS}", polls <= TARGET_POLLS,
            bound=f"baseline {base_polls:.2f}", ratio=polls / base_polls, runs=runs_of(with_est, "polls"),
            note=f"poll requests/image {med(with_est, 'calls'):.3f}"),
        Row("2 polls", "polls/image, no estimated_time", med(without_est, "polls"), "", "", None,
            bound=f"baseline {base_polls:.2f}", ratio=med(without_est, "polls") / base_polls,
            runs=runs_of(without_est, "polls"),
            note=f"poll requests/image {med(without_est, 'calls'):.3f} (falls back to 3 s / 3-5 s, batched)"),
        Row("2 polls", "baseline: fixed 3 s / 3-5 s", base_polls, "", "", None, runs=runs_of(base, "polls"),
            note=f"poll requests/image {base_calls:.3f} (single GET /v1/tasks/{{id}})"),
    ]
