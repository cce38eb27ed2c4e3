"""When each task in flight is looked at again: the due-time heaps of a run, and the rule that times polls.

A run has thousands of tasks waiting and no per-task timer: each waiting task is one entry of a heap of
(due loop time, sequence, attempt id), and one coroutine per heap sleeps until the earliest entry is due
(`DueHeap.until_due`). Two heaps exist: the poll schedule (tasks with an id, polled in batches) and the
resends (attempts whose submit got no answer, sent again with the same idempotency key).

Entries are never removed when a task finishes or is rescheduled; they go stale and are dropped when they
reach the top (`PollSchedule.pollable`). That keeps every change O(log n) and lets an answer reschedule a
task by pushing it again.

The timing rule (`poll_delay`): at the task's own `estimated_time` plus a small margin (an early poll is a
wasted request), else at the reference's first wait and then every 3-5 s, all on the run's time scale, and
never past the task's maximum wait, so it gets one last look before it is left for the next run.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from batchgen import catalog

if TYPE_CHECKING:
    from batchgen.engine.keypool import PooledKey
    from batchgen.engine.runstate import Tracked

BATCH_MAX = 50  # tasks in one batch poll (the API's batch route takes at most 50)
POLL_MARGIN = 0.03  # poll a little after the estimate: an early poll is a wasted request

Entry = tuple[float, int, int]  # (due loop time, sequence, attempt id)


def poll_delay(estimated_s: float | None, *, first: bool, time_scale: float, rng: random.Random) -> float:
    """Seconds (real, on the run's time scale) until a task that has just been submitted or polled is due."""
    if estimated_s is not None and estimated_s > 0:
        return estimated_s * (1 + POLL_MARGIN) + 0.05 * time_scale
    if first:
        return catalog.POLL_INITIAL_WAIT_S * time_scale
    lo, hi = catalog.POLL_INTERVAL_S
    return rng.uniform(lo, hi) * time_scale


async def wait_for_event(event: asyncio.Event, timeout: float | None) -> None:
    """Wait for `event` (cleared by the caller before it looked at the state) or the timeout."""
    if event.is_set():
        return
    if timeout is not None and timeout <= 0:
        await asyncio.sleep(0)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


class DueHeap:
    """Attempt ids by the loop time they are due, and the one timer that waits for the earliest."""

    def __init__(self, seq: Iterator[int] | None = None) -> None:
        self.entries: list[Entry] = []
        self.wake = asyncio.Event()  # an entry was pushed (maybe earlier than the one being waited for)
        self._seq = seq if seq is not None else itertools.count()

    def push(self, due: float, attempt_id: int) -> None:
        heapq.heappush(self.entries, (due, next(self._seq), attempt_id))
        self.wake.set()

    def pop(self) -> Entry:
        return heapq.heappop(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    async def until_due(self, now: Callable[[], float], stopped: Callable[[], bool]) -> bool:
        """Wait until the earliest entry is due (woken early when an earlier one is pushed); False once
        `stopped()` says the run is halting."""
        entries = self.entries
        while True:
            self.wake.clear()
            if stopped():
                return False
            if not entries:
                await wait_for_event(self.wake, None)
                continue
            wait = entries[0][0] - now()
            if wait <= 0:
                return True
            await wait_for_event(self.wake, wait)


class PollSchedule(DueHeap):
    """The tasks with an id, by when they are next polled; and those in a poll call now.

    `tracked` is the run's table of attempts in flight (attempt id → Tracked): an entry whose attempt left
    it, or lost its task id, is stale."""

    def __init__(self, tracked: dict[int, Tracked], seq: Iterator[int] | None = None) -> None:
        super().__init__(seq)
        self._tracked = tracked
        self.polling: set[int] = set()  # attempt ids in a poll call now (its answer reschedules them)

    def pollable(self, attempt_id: int) -> Tracked | None:
        """The tracked task of an entry, unless the entry is stale: the task finished, or it is in a poll call
        now (whose answer reschedules it)."""
        t = self._tracked.get(attempt_id)
        return t if t is not None and t.task_id is not None and attempt_id not in self.polling else None

    def first_due(self, now: float) -> Tracked | None:
        """The earliest due task still to poll; stale entries are dropped on the way."""
        entries = self.entries
        while entries and entries[0][0] <= now:
            t = self.pollable(entries[0][2])
            if t is not None:
                return t
            heapq.heappop(entries)
        return None

    def take_due(self, key: PooledKey | None, now: float) -> list[Tracked]:
        """Up to BATCH_MAX due tasks of `key`, taken off the schedule and marked as being polled (other keys'
        tasks stay due). The caller hands them back with `polled` when the call is over."""
        entries = self.entries
        batch: list[Tracked] = []
        other_keys: list[Entry] = []
        while entries and entries[0][0] <= now and len(batch) < BATCH_MAX:
            entry = heapq.heappop(entries)
            t = self.pollable(entry[2])
            if t is not None and t not in batch:
                if t.key is not key:
                    other_keys.append(entry)
                    continue
                batch.append(t)
        for entry in other_keys:
            heapq.heappush(entries, entry)
        self.polling.update(t.attempt_id for t in batch)
        return batch

    def polled(self, batch: list[Tracked]) -> None:
        """A poll call is over: its tasks are no longer in a call (its answer has rescheduled those still
        running)."""
        self.polling.difference_update(t.attempt_id for t in batch)

    def unwatched(self) -> list[Tracked]:
        """Tracked tasks with an id that nothing will look at again: neither scheduled nor in a poll call.
        Always empty; tests run with `check_invariants` to prove it under faults."""
        scheduled = {attempt_id for _, _, attempt_id in self.entries}
        return [t for attempt_id, t in self._tracked.items()
                if t.task_id is not None and attempt_id not in scheduled and attempt_id not in self.polling]
