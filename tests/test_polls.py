"""The poll schedule (engine/polls.py) and the fallback chain (engine/outcomes.py), on their own."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import pytest

from batchgen import catalog
from batchgen.engine.outcomes import next_fallback
from batchgen.engine.polls import BATCH_MAX, POLL_MARGIN, DueHeap, PollSchedule, poll_delay


def task(attempt_id: int, key: Any = None, task_id: str | None = "t") -> Any:
    return SimpleNamespace(attempt_id=attempt_id, key=key, task_id=task_id and f"{task_id}{attempt_id}")


def test_a_task_is_polled_just_after_its_own_estimate() -> None:
    rng = random.Random(1)
    assert poll_delay(10.0, first=True, time_scale=1.0, rng=rng) == pytest.approx(10 * (1 + POLL_MARGIN) + 0.05)
    assert poll_delay(10.0, first=False, time_scale=0.01, rng=rng) == pytest.approx(10 * (1 + POLL_MARGIN) + 0.0005)


def test_without_an_estimate_the_first_poll_waits_the_reference_time_then_every_few_seconds() -> None:
    rng = random.Random(1)
    assert poll_delay(None, first=True, time_scale=0.5, rng=rng) == catalog.POLL_INITIAL_WAIT_S * 0.5
    assert poll_delay(0.0, first=True, time_scale=1.0, rng=rng) == catalog.POLL_INITIAL_WAIT_S
    lo, hi = catalog.POLL_INTERVAL_S
    later = [poll_delay(None, first=False, time_scale=1.0, rng=rng) for _ in range(200)]
    assert all(lo <= d <= hi for d in later)
    assert max(later) - min(later) > (hi - lo) / 2  # spread out, so the polls of a batch do not stay in step


def test_a_batch_takes_only_due_tasks_of_one_key_and_leaves_the_rest_scheduled() -> None:
    a, b = object(), object()
    tracked = {i: task(i, key=a if i % 2 else b) for i in range(1, 9)}
    polls = PollSchedule(tracked)
    for i in range(1, 9):
        polls.push(float(i), i)  # due at loop time i
    batch = polls.take_due(a, now=5.0)
    assert [t.attempt_id for t in batch] == [1, 3, 5]
    assert polls.polling == {1, 3, 5}
    # Key b's due tasks and everything not yet due are still scheduled; nothing is unwatched.
    assert sorted(e[2] for e in polls.entries) == [2, 4, 6, 7, 8]
    assert polls.unwatched() == []
    assert polls.first_due(5.0) is tracked[2]
    polls.polled(batch)
    assert polls.polling == set()
    assert {t.attempt_id for t in polls.unwatched()} == {1, 3, 5}  # their answer must reschedule them


def test_a_batch_is_at_most_batch_max_and_skips_stale_entries() -> None:
    tracked = {i: task(i) for i in range(1, 2 * BATCH_MAX + 1)}
    polls = PollSchedule(tracked)
    for i in tracked:
        polls.push(0.0, i)
    polls.push(0.0, 1)  # a second entry of the same task: it is polled once
    del tracked[2]  # finished: its entry is stale
    tracked[3].task_id = None  # no id (being resent): not polled
    polls.polling.add(4)  # in a poll call now: its answer reschedules it
    batch = polls.take_due(None, now=0.0)
    ids = [t.attempt_id for t in batch]
    assert len(ids) == BATCH_MAX and len(set(ids)) == BATCH_MAX
    assert not {2, 3, 4} & set(ids)


def test_the_first_due_drops_stale_entries_on_the_way() -> None:
    tracked = {1: task(1), 2: task(2)}
    polls = PollSchedule(tracked)
    polls.push(1.0, 1)
    polls.push(2.0, 2)
    del tracked[1]
    assert polls.first_due(0.5) is None  # nothing due yet
    assert polls.first_due(3.0) is tracked[2]
    assert len(polls) == 1


def test_the_timer_wakes_for_an_earlier_entry_and_stops_when_the_run_halts() -> None:
    async def scenario() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        heap = DueHeap()
        heap.push(loop.time() + 3600, 1)  # an hour away
        waiter = asyncio.ensure_future(heap.until_due(loop.time, lambda: False))
        await asyncio.sleep(0.01)
        heap.push(loop.time(), 2)  # due now: the waiter must not sleep the hour
        woke = await asyncio.wait_for(waiter, 5)
        assert heap.pop()[2] == 2
        halted = await asyncio.wait_for(heap.until_due(loop.time, lambda: True), 5)
        return woke, halted

    assert asyncio.run(scenario()) == (True, False)


def test_the_fallback_chain_goes_down_the_models_once_each() -> None:
    fallbacks = ["b", "a", "c"]
    assert next_fallback("a", "a", fallbacks) == "b"
    assert next_fallback("b", "a", fallbacks) == "c"  # the request's own model is not tried again
    assert next_fallback("c", "a", fallbacks) is None
    assert next_fallback("a", "a", []) is None
    assert next_fallback("z", "a", fallbacks) == "b"  # a model outside the chain starts it over
