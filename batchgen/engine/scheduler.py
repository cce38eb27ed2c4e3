"""The asyncio engine: submit under the rate limit, poll when tasks are likely done, download, retry.

Why it is shaped like this: the API's request budget is the bottleneck, not our CPU. Every image costs one
submission; polls are batched (50 tasks per call) and timed by the task's own `estimated_time`, so they cost
a few percent of the budget; downloads go to a media host and cost none. The store is the only state that
matters: everything held here (the poll heap, the in-flight table) is rebuilt from it on start, so a run
killed at any instant resumes by polling the tasks it has, never by paying for them again.

Moving parts (one task each, no per-request timers):

* **submitter** (submits.py) — claims due pending requests (as many as free slots, `concurrency` at most in flight),
  checks the credit cap, commits an attempt row with its `Idempotency-Key` *before* the call, then sends
  each submit as its own task (they queue on the limiter). The task id is committed as soon as it arrives.
  Attempts whose answer never came (killed, or a transient error) are sent again with the same key from
  a due-time heap.
* **poller** — the poll schedule (polls.py: a heap of due times, and the rule that times each poll); when
  the earliest task is due it takes every due task (≤ 50) into one `get_tasks` call (the client falls back
  to single polls on servers without the batch route) and applies the whole answer in one transaction. A
  task is polled at its `estimated_time` (plus a small margin); without one, at the reference's 3 s, then
  every 3–5 s (× time_scale). A task past `max_wait` keeps its task id and is left for the next run.
* **downloads** (downloads.py) — `download_concurrency` workers bring each finished task's images home
  (fetch, check and store in one worker-thread call, record), and mark the request done when all its
  images are stored and verified.

Every failure goes through `errors.decide()`. Failed *tasks* requeue the request (a new attempt, a new key)
or fail it (outcomes.py adds what only the run knows: re-uploads, the content-policy pause, fallbacks);
failed *calls* (a poll, a download, a submit that got no answer) are retried in place and do not use up the
request's attempts. 429s are the limiter's business (the client penalises it) and never fail a request.

Several keys (keypool.py holds them, keyuse.py is the run's side; issue 15): with a `KeyPool` each
submission is assigned a key when it is claimed (its uploads are made with that key, its attempt row records
the key's fingerprint), and everything after that — resends, polls (batched per key), result re-fetches —
uses that key. A 401 or 402 takes the key out of the pool and the run goes on with the others: a submit
refused that way was never created, so the request goes back to pending for another key without using up an
attempt; a revoked key's tasks in flight cannot be polled and are left (open) for a later run; an
out-of-credits key's are still polled. Only when no key is left does the run stop (exit 3). Tasks of keys
this run does not have are left as they are, and named.

Stopping: `drain()` (credit cap, runtime limit, content-policy pause) stops new submissions and lets the
tasks in flight finish; `halt()` (signals, 401/402, the hard runtime limit) also stops polling and, after a
short grace for calls already answered, cancels what is left. Store writes are synchronous and happen
between awaits, so a cancellation can never interrupt one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchgen import catalog
from batchgen.engine.downloads import Downloads
from batchgen.engine.health import CallHealth
from batchgen.engine.keypool import KeyPool, PooledKey
from batchgen.engine.keyuse import KeyUse
from batchgen.engine.outcomes import TaskFailures
from batchgen.engine.polls import PollSchedule, poll_delay
from batchgen.engine.ratelimit import POLL
from batchgen.engine.runstate import Counters, StopReason, Tracked
from batchgen.engine.submits import Submissions
from batchgen.errors import (
    Action,
    ApiError,
    LocalFaultError,
    decide,
    is_transient,
    rule_for,
)
from batchgen.models import GenerationRequest, QualitySettings
from batchgen.storage.base import Storage
from batchgen.storage.local import LocalStorage
from batchgen.store.base import BaseStore
from batchgen.store.records import (
    AttemptState,
    Outcome,
    RequestRecord,
)
from batchgen.units import plural

if TYPE_CHECKING:
    from batchgen.api.answers import TaskSnapshot
    from batchgen.api.client import EvolinkClient

HALT_GRACE_S = 2.0
POLL_ERRORS_BEFORE_LEAVING = 5
# Batch polls in flight at once: one slow answer (or one held at the limiter) must not hold up the others.
POLLS_IN_FLIGHT = 4

# (request, body) -> body actually sent; the uploads step swaps local paths for uploaded URLs here.
BodyPreparer = Callable[[RequestRecord, GenerationRequest], Awaitable[dict[str, Any]]]
# (body sent, epoch it was sent) -> True when an upload of ours in it may explain an image_processing_error.
ReferenceCheck = Callable[[dict[str, Any], float], bool]
EventSink = Callable[[str, dict[str, Any]], None]


# Shared stores (several runners on one job): how often to look for attempts of dead runners, as a fraction
# of the store's lease (takeover then happens within about 1⅓ leases of the death).
TAKEOVER_EVERY_LEASE = 1 / 3

@dataclass
class SchedulerConfig:
    out_dir: Path | None
    filename_template: str
    concurrency: int = 20
    max_attempts: int = 3
    fallback_models: list[str] = field(default_factory=list)
    max_wait_s: float = catalog.POLL_MAX_WAIT_S
    download_concurrency: int = 8
    regenerate_expired: bool = False
    policy_pause_after: int = 20
    max_credits: float | None = None
    time_scale: float = 1.0
    submit_deadline: float | None = None  # loop time: no new submissions after it
    hard_deadline: float | None = None  # loop time: halt
    runtime_end: float | None = None  # loop time the run must be over by (--max-runtime): the halt's grace ends there
    patience_s: float = 300.0  # emulated seconds of every call failing before the run stops (exit 3)
    check_invariants: bool = False  # tests: assert the poll invariant after every change (costs O(n))
    quality: QualitySettings = field(default_factory=QualitySettings)  # checks on every download (issue 16)
    storage: Storage | None = None  # where images go (a bucket); None: the local folder out_dir


@dataclass
class RunResult:
    reason: StopReason
    message: str
    counters: Counters


class Scheduler:
    def __init__(self, store: BaseStore, client: EvolinkClient, config: SchedulerConfig, *,
                 emit: EventSink | None = None, prepare_body: BodyPreparer | None = None,
                 reference_failed: ReferenceCheck | None = None, rng: random.Random | None = None,
                 pool: KeyPool | None = None) -> None:
        self.store = store
        self.client = client
        self.pool = pool
        self.keys = KeyUse(self, pool)  # which key sends what; refused keys; tasks left for other keys
        self.cfg = config
        if config.storage is None and config.out_dir is None:
            raise ValueError("SchedulerConfig needs out_dir or storage")
        self.storage: Storage = config.storage or LocalStorage(config.out_dir or Path())
        self.emit: EventSink = emit or (lambda kind, fields: None)
        self.prepare_body = prepare_body
        self.reference_failed = reference_failed
        self.rng = rng or random.Random()
        self.counters = Counters()
        # attempt id → tracked (submitted, not yet final): the table the submissions, polls and keys share
        self.tracked: dict[int, Tracked] = {}
        self.api_health = CallHealth.scaled("the API", config.patience_s, config.time_scale)
        self._polls = PollSchedule(self.tracked)  # tasks with an id, by when they are next polled
        self._draining: tuple[StopReason, str] | None = None
        self._halting: tuple[StopReason, str] | None = None
        self.failures = TaskFailures(self)  # the rule for failed tasks (outcomes.py)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poll_slots = asyncio.Semaphore(POLLS_IN_FLIGHT)
        self._crash: BaseException | None = None
        self.submits = Submissions(self)
        self.downloads = Downloads(self)

    # --- control ----------------------------------------------------------------------------------

    def drain(self, reason: StopReason, message: str) -> None:
        """No new submissions; tasks in flight finish and download."""
        if self._draining is None:
            self._draining = (reason, message)
            self.emit("stopping", {"reason": reason.value, "message": message})
        self.wake()

    def halt(self, reason: StopReason, message: str) -> None:
        """Stop as soon as calls already under way are answered (or the grace ends); all is resumable."""
        if self._halting is None:
            self._halting = (reason, message)
            self.drain(reason, message)
        self.wake()
        self._polls.wake.set()
        self.submits.resends.wake.set()

    @property
    def draining(self) -> bool:
        """Whether new submissions have stopped (the tasks in flight still finish)."""
        return self._draining is not None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the run is on (None before `run`)."""
        return self._loop

    @property
    def halting(self) -> bool:
        """Whether the run is halting (calls under way get a short grace; nothing new starts)."""
        return self._halting is not None

    def wake(self) -> None:
        """Something the submitter waits on changed (a slot or a download freed)."""
        self.submits.wake.set()

    @property
    def stop_state(self) -> tuple[StopReason, str] | None:
        """Why the run is stopping (None while it is not)."""
        return self._halting or self._draining

    # --- the run ----------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        loop = self._loop = asyncio.get_running_loop()
        c = self.counters
        c.started = loop.time()
        self._load_from_store()
        workers = [self.spawn(self._poller()), self.spawn(self.submits.resender())]
        if self.store.shared:
            workers.append(self.spawn(self._take_over_loop()))
        workers += [self.spawn(self.downloads.worker()) for _ in range(self.cfg.download_concurrency)]
        try:
            await self.submits.claimer()
        except LocalFaultError as error:
            self.local_fault(error)
        finally:
            if self._halting is not None:
                await self._grace()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.submits.close()  # answers of the last turn: their task ids go to disk too
            self._release_unsent()
            self.downloads.close()  # and images already in place
            del workers
        if self._crash is not None:
            raise self._crash
        return self._result()

    def _release_unsent(self) -> None:
        # Not written (a full disk): they stay `sending`, and the next run sends them with the same key.
        with contextlib.suppress(LocalFaultError):
            self.submits.release_unsent()

    def _result(self) -> RunResult:
        c = self.counters
        stop = self._halting or self._draining
        if stop is not None:
            return RunResult(stop[0], stop[1], c)
        if self.keys.left_open:
            open_tasks = plural(len(self.keys.left_open), "task")
            return RunResult(StopReason.KEY_MISSING, f"{open_tasks} of keys this run does not have or that were "
                             f"revoked ({self.keys.names()}) stay open for a run with those keys"
                             f"{self.keys.abandon_hint()}", c)
        if c.left:
            return RunResult(StopReason.RUNTIME, f"{plural(c.left, 'task')} still running after the maximum wait; "
                             "their task ids are kept and the next run polls them", c)
        return RunResult(StopReason.FINISHED, "finished", c)

    async def _grace(self) -> None:
        """Give calls already under way a moment to be answered and committed."""
        assert self._loop is not None
        end = self._loop.time() + HALT_GRACE_S
        if self.cfg.runtime_end is not None:
            end = min(end, self.cfg.runtime_end)
        while self._loop.time() < end and (bool(self._polls.polling) or any(
                not t.done() for t in self._tasks if t.get_name() == "call")):
            await asyncio.sleep(0.05)

    def spawn(self, coro: Awaitable[Any], name: str = "worker") -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is None:
            return
        if isinstance(exc, LocalFaultError):
            # This machine failed us (disk full, folder gone, database unwritable): stop new work, resumably.
            self.local_fault(exc)
            return
        # A bug in a worker (or an error we must report as it is): stop everything rather than hang.
        self.internal_error(exc)

    def internal_error(self, error: BaseException) -> None:
        """A bug: stop everything, and raise it from `run` once the run is wound down."""
        self.halt(StopReason.SIGNAL, f"internal error: {error!r}")
        self._crash = error

    def local_fault(self, error: LocalFaultError) -> None:
        self.halt(StopReason.LOCAL_FAULT, f"{error}; nothing was lost: fix it and run again to continue")

    def _load_from_store(self) -> None:
        """Rebuild the in-flight state from the store (a fresh run, or a resume after a kill)."""
        assert self._loop is not None
        counts = self.store.counts()
        c = self.counters
        c.total = sum(v for k, v in counts.items() if k != "removed")
        c.done, c.failed = counts["done"], counts["failed"]
        totals = self.store.credit_totals()
        c.credits_reserved, c.credits_used = totals.reserved, totals.used
        self.downloads.start()
        self._track_open(self.store.open_attempts(), honour_not_before=True)

    # --- several runners on one job (shared stores only) -----------------------------------------------

    def take_over_interval(self) -> float:
        return float(getattr(self.store, "lease_s", 15.0)) * TAKEOVER_EVERY_LEASE

    async def _take_over_loop(self) -> None:
        """Every third of a lease: take over the attempts of runners whose lease expired, and re-read the
        job-wide credit totals so that --max-credits holds for the job as a whole. (With SQLite there is
        one runner per database and this loop is not started.)"""
        while self._halting is None:
            await asyncio.sleep(self.take_over_interval())
            if self._draining is not None:
                continue
            totals = self.store.credit_totals()
            self.counters.credits_reserved, self.counters.credits_used = totals.reserved, totals.used
            taken = self.store.runners.take_over()
            if taken:
                self._track_taken_over(taken)
                self.emit("takeover", {"requests": len(taken), "message": f"took over {plural(len(taken), 'request')} "
                                       "of a runner that stopped answering"})
                self.wake()

    def _track_taken_over(self, pairs: list[tuple[RequestRecord, Any]]) -> None:
        """Track attempts taken over from a dead runner exactly as a resumed run's own."""
        self._track_open(pairs, honour_not_before=False)

    def _track_open(self, pairs: list[tuple[RequestRecord, Any]], *, honour_not_before: bool) -> None:
        """Track open attempts found in the store (a resume, or a takeover): downloads for completed tasks,
        polls for task ids, resends with the same key for the rest."""
        assert self._loop is not None
        now_loop, now_wall = self._loop.time(), time.time()
        for req, att in pairs:
            if att.id in self.tracked:
                continue
            t = Tracked(req=req, attempt_id=att.id, attempt_no=att.attempt_no, attempts=req.attempts,
                         idempotency_key=att.idempotency_key, model=att.model,
                         body=att.body or self._body_for(req, att.model),
                         est_credits=att.credits_estimated or 0.0,
                         reserved=att.credits_reserved or att.credits_estimated or 0.0,
                         task_id=att.task_id, since=now_loop, submitted_wall=att.submitted_at or now_wall,
                         submit_tries=att.submit_tries, result_urls=tuple(att.result_urls), resumed=True)
            if self.pool is not None:
                t.key = self.pool.get(att.key_fp)
                if req.state != "completed" and (t.key is None or not t.key.can_poll):
                    # Tasks and idempotency records belong to the key's account: no other key can look at
                    # this task or safely send it again. Left open for a run that has the key.
                    self.keys.leave_open(req.key, t.key.name if t.key else att.key_fp)
                    continue
            if req.state == "completed":
                if att.state == AttemptState.COMPLETED:
                    self.downloads.add(t)
                continue
            self.tracked[att.id] = t
            if att.task_id is None:
                wait_s = max(0.0, req.not_before - now_wall) if honour_not_before else 0.0
                self.submits.resends.push(now_loop + wait_s, t.attempt_id)
            else:
                self._polls.push(now_loop, t.attempt_id)
        self.counters.in_flight = len(self.tracked)
        left = self.keys.left_open
        if left:
            self.emit("warning", {"tasks": len(left), "message": (
                f"{plural(len(left), 'task')} sent with keys this run does not have "
                f"({self.keys.names()}): they cannot be looked at with another key and are left for a run "
                f"that has them (e.g. {', '.join(k for k, _ in left[:3])})")})

    def client_for(self, t: Tracked) -> EvolinkClient:
        """The client of the key that sent `t` (the run's client without a pool)."""
        return t.key.client if t.key is not None else self.client

    def _body_for(self, req: RequestRecord, model: str) -> dict[str, Any]:
        body = GenerationRequest.model_validate(req.params).api_body()
        body["model"] = model
        return body

    # --- the rule for failed calls (errors.decide; engine/health.py) ------------------------------

    def call_failed(self, error: ApiError, tries: int, health: CallHealth | None = None) -> float:
        """A call failed transiently: note it, stop the run if every call has failed for the patience, and
        return how long to wait before this call is tried again."""
        assert self._loop is not None
        health = health or self.api_health
        now = self._loop.time()
        health.failed(now, error)
        self.counters.call_failures += 1
        why = health.exhausted(now)
        if why is not None:
            self.halt(StopReason.UNREACHABLE, why)
        delay = decide(error, tries, 0, self.rng, self.cfg.time_scale, persistent=health.persistent(now)).delay_s
        # Never sleep past the patience: the call after it decides whether the run stops.
        return min(delay, max(0.05 * self.cfg.time_scale, health.patience_left_s(now)))

    # --- polling ----------------------------------------------------------------------------------

    def watch(self, t: Tracked, snap: TaskSnapshot) -> None:
        """A task's id is on disk: apply its answer if it is already final, else schedule its first poll."""
        if snap.final:
            self._apply([(t, snap)])
        else:
            self._schedule_poll(t, snap, first=True)
        self._check()

    def _schedule_poll(self, t: Tracked, snap: TaskSnapshot | None, first: bool = False) -> None:
        assert self._loop is not None
        delay = poll_delay(snap.estimated_time_s if snap is not None else None, first=first,
                           time_scale=self.cfg.time_scale, rng=self.rng)
        now = self._loop.time()
        if now + delay - t.since > self.cfg.max_wait_s:
            # Do not sleep past the maximum wait: one last look at it, then leave it.
            delay = max(0.0, t.since + self.cfg.max_wait_s - now)
        self._polls.push(now + delay, t.attempt_id)

    async def _poller(self) -> None:
        """Polls every due task, up to BATCH_MAX in one call and POLLS_IN_FLIGHT calls at once."""
        assert self._loop is not None
        polls, clock = self._polls, self._loop.time
        while await polls.until_due(clock, lambda: self.halting):
            await self._poll_slots.acquire()
            first = polls.first_due(clock())
            if first is None:
                self._poll_slots.release()
                continue
            # A task is polled with the key that created it: one call per key, under that key's limiter. The
            # call's turn there comes first and its ids after: the tasks that fall due while it waits (its
            # grace, engine/ratelimit.py) go in the same call instead of the next ones.
            limiter = self.client_for(first).limiter
            if limiter is not None:
                await limiter.acquire(POLL)
            batch = polls.take_due(first.key, clock()) if self._halting is None else []
            if not batch:
                self._poll_slots.release()  # (a turn taken for nothing: the tasks were dealt with meanwhile)
                continue
            self.spawn(self._poll_call(batch, paid=limiter is not None), name="call")

    async def _poll_call(self, batch: list[Tracked], *, paid: bool = False) -> None:
        try:
            await self._poll(batch, paid=paid)
        finally:
            self._polls.polled(batch)
            self._poll_slots.release()
        self._check()

    async def _poll(self, batch: list[Tracked], *, paid: bool = False) -> None:
        assert self._loop is not None
        self.counters.polls += 1
        self.counters.tasks_polled += len(batch)
        try:
            found = await self.client_for(batch[0]).get_tasks([t.task_id for t in batch if t.task_id], paid=paid)
        except ApiError as error:
            self._poll_failed(batch, error)
            return
        self.api_health.ok()
        finals: list[tuple[Tracked, TaskSnapshot]] = []
        running: list[Outcome] = []
        for t in batch:
            snap = found.get(t.task_id or "")
            if snap is None:
                self._task_missing(t)
                continue
            t.poll_errors = t.missing = 0
            if snap.final:
                finals.append((t, snap))
                continue
            if snap.credits_reserved is not None and snap.credits_reserved != t.reserved:
                self.counters.credits_reserved += snap.credits_reserved - t.reserved
                t.reserved = snap.credits_reserved
                running.append(Outcome(t.attempt_id, t.req.key, "running", credits_reserved=snap.credits_reserved))
            if self._loop.time() - t.since >= self.cfg.max_wait_s:
                self._leave(t)
            else:
                self._schedule_poll(t, snap)
        self.store.record_outcomes(running)
        self._apply(finals)

    def _poll_failed(self, batch: list[Tracked], error: ApiError) -> None:
        """A poll call failed: every task in it stays watched and is polled again after a backoff."""
        assert self._loop is not None
        for t in batch:
            t.poll_errors += 1
        worst = max(t.poll_errors for t in batch)
        if is_transient(error):
            delay = self.call_failed(error, worst)
        else:
            self.api_health.ok()
            key = batch[0].key
            stop = decide(error, 1, 0).action is Action.STOP
            if stop and key is not None and self.keys.several:
                self.keys.refused(key, error)
                if not key.can_poll:
                    return  # revoked: its tasks were left for a run where it works (keyuse.py)
                # Out of credits: its tasks are still polled (with backoff, below).
            elif stop:
                self.keys.refused_alone(key, error)
                self.halt(StopReason.AUTH, f"{error}: {rule_why(error)}")
                return
            # Anything else (a 400 on a batch call, say) is retried in place too; the task ids stay.
            delay = min(60.0, 2.0 ** worst) * self.cfg.time_scale
        now = self._loop.time()
        self.emit("poll_error", {"tasks": len(batch), "error": str(error), "retry_in_s": round(delay, 3)})
        for t in batch:
            # Past max_wait a task is left only once polls keep failing: a few failed polls are the
            # service's problem, not a sign that the task is stuck.
            if now - t.since >= self.cfg.max_wait_s and t.poll_errors >= POLL_ERRORS_BEFORE_LEAVING:
                self._leave(t)
            else:
                self._polls.push(now + delay, t.attempt_id)

    # --- the invariant --------------------------------------------------------------------------------

    def unwatched(self) -> list[Tracked]:
        """Tracked tasks with a task id that nothing will look at again (polls.PollSchedule.unwatched). Always
        empty. (A finished task leaves the tracked set for the download queue, which holds it until its images
        are saved.)"""
        return self._polls.unwatched()

    def _check(self) -> None:
        if self.cfg.check_invariants and self._halting is None:
            lost = self.unwatched()
            if lost:
                raise AssertionError(f"tasks with an id that nothing polls: {[t.task_id for t in lost]}")

    def _task_missing(self, t: Tracked) -> None:
        """The server does not know the task (404 or absent from a batch answer)."""
        t.missing += 1
        if t.missing < 3:
            assert self._loop is not None
            self._polls.push(self._loop.time() + catalog.POLL_INITIAL_WAIT_S * self.cfg.time_scale, t.attempt_id)
            return
        # Lost for good: the task was never going to finish; submit again as a new attempt.
        self._task_failed(t, "task_not_found", "the API no longer knows task " + (t.task_id or "?"))

    def _leave(self, t: Tracked) -> None:
        """Past max_wait: keep the task id for the next run, unless it has been running for so long that it
        is clearly stuck (twice max_wait since it was submitted, across runs): then it is retried."""
        if time.time() - t.submitted_wall >= 2 * self.cfg.max_wait_s:
            self._task_failed(t, "generation_timeout",
                              f"task {t.task_id} gave no result within {2 * self.cfg.max_wait_s:g}s; submitting again")
            return
        self.finish_tracking(t, still_open=True)
        self.counters.left += 1
        self.emit("left", {"key": t.req.key, "task_id": t.task_id,
                           "message": "still running after the maximum wait; the next run polls it again"})

    def tracked_of(self, key: PooledKey) -> list[Tracked]:
        """The tasks in flight (with a task id) that `key` sent."""
        return [t for t in self.tracked.values() if t.key is key and t.task_id is not None]

    def finish_tracking(self, t: Tracked, *, still_open: bool = False) -> None:
        """`t` leaves the table of tasks in flight (finished, failed, or left for the next run).

        A task left open (`still_open`: its key was revoked, or it ran past max_wait) may still finish and
        be charged on its account, and the store still counts its attempt as reserved: so its credits stay
        in the reserve that --max-credits is checked against, as a resumed run counts them (credit_totals)."""
        if self.tracked.pop(t.attempt_id, None) is not None:
            if not still_open:
                self.counters.credits_reserved -= t.reserved
            self.counters.in_flight = len(self.tracked)
            self.wake()

    # --- outcomes ---------------------------------------------------------------------------------

    def _apply(self, finals: list[tuple[Tracked, TaskSnapshot]]) -> None:
        """Final task snapshots: decide, commit them in one transaction, then act."""
        outcomes: list[Outcome] = []
        after: list[Callable[[], None]] = []
        charged = 0.0
        for t, snap in finals:
            self.finish_tracking(t)
            if snap.status == "completed" and snap.results:
                used = snap.credits_used if snap.credits_used is not None else t.reserved
                outcomes.append(Outcome(t.attempt_id, t.req.key, "completed", result_urls=snap.results,
                                        credits_reserved=snap.credits_reserved, credits_used=used))
                self.counters.credits_used += used
                charged += used
                t.result_urls = snap.results
                self.failures.succeeded()
                after.append(functools.partial(self._completed, t, snap))
                continue
            code = snap.error_code or "generation_failed_no_content"
            message = snap.error_message or ("the task completed without images" if snap.status == "completed"
                                             else "the task failed")
            outcome, then = self.failures.outcome(t, code, message)
            outcomes.append(outcome)
            after.append(then)
        self.store.record_outcomes(outcomes)
        # Counted once committed: a write that fails leaves the tasks open, and the next run records them.
        self.counters.run_credits_used += charged
        for fn in after:
            fn()

    def _task_failed(self, t: Tracked, code: str, message: str) -> None:
        self.finish_tracking(t)
        outcome, then = self.failures.outcome(t, code, message)
        self.store.record_outcomes([outcome])
        then()

    def on_requeued(self, key: str, code: str, delay_s: float, model: str | None) -> None:
        self.submits.nothing_pending = False
        self.counters.requeued += 1
        fields: dict[str, Any] = {"key": key, "code": code, "retry_in_s": round(delay_s, 3)}
        if model:
            fields["model"] = model
        self.emit("requeued", fields)
        self.wake()

    def on_failed(self, key: str, code: str, message: str) -> None:
        self.counters.failed += 1
        self.emit("failed", {"key": key, "code": code, "message": message})
        self.wake()

    def _completed(self, t: Tracked, snap: TaskSnapshot) -> None:
        self.emit("completed", {"key": t.req.key, "task_id": snap.id, "images": len(snap.results),
                                "credits_used": snap.credits_used})
        self.downloads.add(t)


def rule_why(error: ApiError) -> str:
    return rule_for(error).why
