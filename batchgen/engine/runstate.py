"""What a run keeps in memory about itself: why it stops, what it counts, and each request in flight.

Shared by the scheduler (scheduler.py) and the download side (downloads.py); nothing here touches the
store or the network.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchgen.store.records import RequestRecord

if TYPE_CHECKING:
    from batchgen.engine.keypool import PooledKey


# How a run stopped at the credit cap goes on. The stop message carries it, and the summary then leaves out
# "run the same command again", which would stop at once (the cap counts every run's spend).
RAISE_CAP = "run again with a higher --max-credits to go on (the cap counts the job's spend over all its runs)"


class StopReason(enum.StrEnum):
    FINISHED = "finished"
    SIGNAL = "signal"
    BUDGET = "budget"
    RUNTIME = "runtime"
    AUTH = "auth"  # 401/402: fix the key or the balance, then run again
    POLICY = "policy"  # too many content-policy refusals in a row
    UNREACHABLE = "unreachable"  # every call refused or failing for longer than the patience
    LOCAL_FAULT = "local_fault"  # this machine: disk full, read-only or vanished folder, database unwritable
    STORAGE = "storage"  # the output bucket refused a write or stayed unreachable
    KEY_MISSING = "key_missing"  # only tasks of keys this run does not have (or that were revoked) are left


@dataclass
class Counters:
    """What the progress line and the summary show; updated in place."""

    total: int = 0
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    submitted: int = 0  # submits sent this run
    replayed: int = 0
    polls: int = 0  # poll calls this run (a batch poll is one)
    tasks_polled: int = 0
    images: int = 0
    requeued: int = 0
    left: int = 0  # tasks left past max_wait for the next run
    call_failures: int = 0  # failed calls retried in place (429, 5xx, timeouts, drops), all services
    credits_reserved: float = 0.0  # the job's: tasks in flight (the credit cap counts every run's)
    credits_used: float = 0.0  # the job's: finished tasks of every run
    # Charged for the tasks this run saw finish, whichever run sent them: a killed run never reports its
    # tasks, so counting where the charge is final makes the runs' figures add up to the job's total.
    run_credits_used: float = 0.0
    done_this_run: int = 0
    started: float = 0.0  # loop time


@dataclass(eq=False)
class Tracked:
    """A request in flight in this run: its current attempt and where it is."""

    req: RequestRecord
    attempt_id: int
    attempt_no: int
    attempts: int  # the request's charged attempts including this one
    idempotency_key: str  # as committed on the attempt row; every send of this attempt uses it
    model: str
    body: dict[str, Any]
    est_credits: float
    reserved: float
    task_id: str | None = None
    since: float = 0.0  # loop time this run started tracking it (max_wait counts from here)
    submitted_wall: float = 0.0
    submit_tries: int = 0  # failed sends of this attempt (transient; retried in place with the same key)
    poll_errors: int = 0
    missing: int = 0
    result_urls: tuple[str, ...] = ()
    refetched: bool = False
    resumed: bool = False  # loaded from the store at start (not submitted by this run)
    key: PooledKey | None = None  # with a key pool: the key it was sent with (polls and fetches use it)
    unanswered: bool = False  # a send of it went unanswered (timeout, drop, 5xx): the task may exist
    on_wire: bool = False  # a send of it left the limiter and has not been answered yet (it may exist)
