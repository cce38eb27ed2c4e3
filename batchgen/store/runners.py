"""The job's runners: who is running this job, as `store.runners` (docs/scale-out.md).

A `batchgen run` first becomes one of its job's runners and stays one until it ends; everything about
that — the run lock of a SQLite file (one runner per database), the registration and heartbeat of a
shared store's runner, the live runners, the job's elapsed time across them, and taking over the requests
of a runner whose lease expired — is a concern of its own, apart from the requests' lifecycle. So the
store holds it as a ledger, one implementation per backend: sqlite_runners.py (the single-runner case:
nothing to take over, no one else to count) and postgres_runners.py. The runner's id stays readable as
`store.runner_id`, because the store's claims and the run log name it.
"""

from __future__ import annotations

import abc

from batchgen.store.records import AttemptRecord, RequestRecord, RunnerInfo


class Runners(abc.ABC):
    """The runners of one job's store; every method commits what it changes."""

    @abc.abstractmethod
    def lock(self) -> None:
        """Become this job's runner (SQLite: the only one; shared stores: one of several), or raise
        StoreLockedError naming the holder."""

    @abc.abstractmethod
    def unlock(self) -> None:
        """Stop being this job's runner (a shared store releases this runner's requests at once); the
        store's `close()` calls it."""

    @abc.abstractmethod
    def take_over(self, limit: int = 500) -> list[tuple[RequestRecord, AttemptRecord]]:
        """Open attempts of runners whose lease expired, now claimed by this runner (poll them, or send
        them again with their own idempotency key). Single-runner stores have none."""

    @abc.abstractmethod
    def unfinished_elsewhere(self) -> int:
        """Unfinished requests other runners may still hold (single-runner stores: none)."""

    @abc.abstractmethod
    def live(self) -> list[RunnerInfo]:
        """The runners sharing this job right now (single-runner stores: none are recorded)."""

    @abc.abstractmethod
    def running(self) -> tuple[bool, int | None]:
        """Whether a run of this job is going right now, read without joining it (`batchgen status`), and
        the pid of the process that holds it where one does (SQLite: the run lock's holder)."""

    @abc.abstractmethod
    def elapsed_s(self) -> float:
        """Seconds since the job's current group of runners started (for a job-wide --max-runtime); 0 for
        single-runner stores, where this run's own start counts."""
