"""The submission side of a run: due requests claimed, attempts committed, submits sent and answered.

Why it is shaped like this: a submission is the one call that costs credits, so its every step is on disk
before the next depends on it. A claim checks the credit cap, prepares each body (uploading local
reference files), commits the attempt rows with their `Idempotency-Key` *before* any call, then sends each
submit as its own task (they queue on the limiter). The task ids answered within one loop turn are
committed together in one transaction, and nothing waits on an id (a poll, an outcome) until that commit
is done. An attempt whose submit got no answer (429, 5xx, a timeout, a dropped connection) is sent again
with the same key from a due-time heap, however often, never charged to `max_attempts`: if the server did
create the task, the resend gets it back. A body that could not be prepared was never sent, so those
failures have their own count.

The scheduler is the host: it owns the table of tasks in flight, the poll schedule, the stop state and the
rule for failed calls; this module reports back to it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from batchgen import catalog
from batchgen.engine.polls import BATCH_MAX, DueHeap, wait_for_event
from batchgen.engine.runstate import RAISE_CAP, StopReason, Tracked
from batchgen.engine.uploads import UploadWaitError
from batchgen.errors import (
    Action,
    ApiError,
    BatchgenError,
    ConnectError,
    LocalFaultError,
    code_of,
    decide,
    is_transient,
)
from batchgen.models import GenerationRequest
from batchgen.store.records import NewAttempt, Outcome, RequestRecord
from batchgen.units import credits_text

if TYPE_CHECKING:
    from batchgen.api.answers import TaskSnapshot
    from batchgen.engine.keypool import PooledKey
    from batchgen.engine.scheduler import Scheduler

# Tries at preparing one request's body (uploading its local files) in one run before it fails, for
# refusals that are not transient (those retry like any call); uploads cost no credits, so they are not
# limited by the request's max_attempts.
PREPARE_MAX_TRIES = 5


class Submissions:
    """Claims, attempt rows, submits and their answers; the resends of unanswered submits."""

    def __init__(self, host: Scheduler) -> None:
        self.host = host
        self.store = host.store
        self.cfg = host.cfg
        self.counters = host.counters
        self.pool = host.pool
        self.keys = host.keys
        self.tracked = host.tracked  # attempt id → Tracked: the host's table, shared
        self.wake = asyncio.Event()  # the claimer's event (a slot, a download or a request came free)
        self.resends = DueHeap()  # attempts whose submit got no answer: sent again with the same key
        self.nothing_pending = False  # the store had no pending request at the last look (see claimer)
        self._prepare_failures: dict[str, int] = {}  # request key → failed body preparations (uploads) this run
        self._answered: list[tuple[Tracked, TaskSnapshot]] = []  # submits answered, not yet committed
        self._flush_handle: asyncio.Handle | None = None

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        return self.host.loop

    def close(self) -> None:
        """At the end of the run: the answers of the last loop turn are committed too."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self.flush_answered()

    def release_unsent(self) -> int:
        """At the end of the run: the attempts that never reached the API go back to pending, unused.

        They were still waiting at the limiter when the run stopped, or every send was answered with a
        429 or never connected, so no task exists: left `sending`, status would count them in flight with
        their credits reserved until the next run. An attempt that may have reached the API (a send
        unanswered or cut off by the stop, or loaded from an earlier run) stays `sending`, for the next run
        to send again with the same idempotency key."""
        unsent = [t for t in self.tracked.values()
                  if t.task_id is None and not (t.on_wire or t.unanswered or t.resumed)]
        if not unsent:
            return 0
        self.store.record_outcomes([Outcome(t.attempt_id, t.req.key, "requeue", not_before=time.time(),
                                            consume_attempt=False) for t in unsent])
        for t in unsent:
            self.host.finish_tracking(t)
        return len(unsent)

    async def claimer(self) -> None:
        assert self._loop is not None
        loop = self._loop
        cfg = self.cfg
        while True:
            # Cleared before looking, so a wake-up that arrives while we look is not lost.
            self.wake.clear()
            if self.host.halting:
                return
            if cfg.hard_deadline is not None and loop.time() >= cfg.hard_deadline:
                self.host.halt(StopReason.RUNTIME, "runtime limit reached; the rest is left for the next run")
                return
            if cfg.submit_deadline is not None and loop.time() >= cfg.submit_deadline:
                self.host.drain(StopReason.RUNTIME, "the runtime limit is near: no new submissions; the rest is "
                                "left for the next run")
            if self.host.draining:
                if not self.tracked and self.host.downloads.pending == 0:
                    return
                await wait_for_event(self.wake, self._deadline_timeout())
                continue
            free = cfg.concurrency - len(self.tracked)
            timeout: float | None = None
            busy = bool(self.tracked) or self.host.downloads.pending > 0
            if free > 0 and not (self.nothing_pending and busy):
                if await self.claim(min(free, BATCH_MAX)):
                    # Let the sends just started go out before claiming the next batch: at the start of a
                    # run the claims of a whole --concurrency (20 batches of 50) held back the first submit.
                    await asyncio.sleep(0)
                    continue
                nb = self.store.next_not_before()
                if nb is None and not busy:
                    if not self.store.runners.unfinished_elsewhere():
                        return  # nothing pending, nothing in flight: the job is finished
                    # Other runners still hold work (shared store): stay to take it over if they die.
                    nb = time.time() + self.host.take_over_interval()
                # Nothing pending at all (one runner): until a request comes back (Scheduler.on_requeued), each task
                # that finishes wakes this loop for nothing; it need not ask the store again each time.
                self.nothing_pending = nb is None and not self.store.shared
                timeout = None if nb is None else max(0.0, nb - time.time())
            await wait_for_event(self.wake, _min_opt(timeout, self._deadline_timeout()))

    def _deadline_timeout(self) -> float | None:
        assert self._loop is not None
        now = self._loop.time()
        ahead = [self.cfg.hard_deadline]
        if not self.host.draining:
            ahead.append(self.cfg.submit_deadline)
        outs = [d - now for d in ahead if d is not None]
        return max(0.0, min(outs)) if outs else None

    async def claim(self, limit: int) -> int:
        """Claim up to `limit` due requests: budget check, body, attempt rows committed, submits started."""
        rows = self.store.next_due(limit)
        if not rows:
            return 0
        new: list[NewAttempt] = []
        prepared: list[tuple[RequestRecord, dict[str, Any], float]] = []
        cap = self.cfg.max_credits
        c = self.counters
        pending_reserve = 0.0
        keys: list[PooledKey | None] = []
        for req in rows:
            est = _estimate(req.model, req.n)
            if cap is not None and c.credits_reserved + c.credits_used + pending_reserve + est > cap + 1e-9:
                self.host.drain(StopReason.BUDGET, f"the credit cap of {credits_text(cap)} would be passed (spent "
                                f"{credits_text(c.credits_used)}, reserved "
                                f"{credits_text(c.credits_reserved + pending_reserve)}, next request "
                                f"about {credits_text(est)}); {RAISE_CAP}")
                break
            key = self.keys.assign(est, self._loop.time() if self._loop else 0.0)
            if self.pool is not None and key is None:
                break
            try:
                body, rewritten = await self._prepare(req, key)
            except ApiError as error:
                if self.pool is not None:
                    self.pool.refund(key, est)
                if key is not None and self.keys.several and error.status in (401, 402):
                    self.keys.refused(key, error)  # uploads refused by this key: the request waits for another
                    self.store.defer(req.key, time.time(), code_of(error), error.message)
                    continue
                self._defer_unsent(req, error)
                continue
            except LocalFaultError:
                raise
            except UploadWaitError as wait:
                # The file quota is full of our own files that requests in progress hold: try again later.
                if self.pool is not None:
                    self.pool.refund(key, est)
                self.store.defer(req.key, time.time() + wait.delay_s, wait.code, str(wait))
                continue
            except BatchgenError as error:
                if self.pool is not None:
                    self.pool.refund(key, est)
                self.store.fail(req.key, "upload_failed", str(error))
                self.host.on_failed(req.key, "upload_failed", str(error))
                continue
            if rewritten:
                self.host.api_health.ok()  # the Files API answered
            if self.host.halting:
                break
            # The body is kept only when uploads rewrote it: a resend must carry exactly the same body.
            new.append(NewAttempt(req.key, req.attempt_no + 1, req.model, est, body if rewritten else None,
                                  key_fp=key.fingerprint if key else None,
                                  scoped=self.pool is not None and not self.pool.single))
            prepared.append((req, body, est))
            keys.append(key)
            pending_reserve += est
        if not new:
            return 0
        ids = self.store.start_attempts(new)
        loop_now = self._loop.time() if self._loop else 0.0
        for attempt_id, (req, body, est), na, key in zip(ids, prepared, new, keys, strict=True):
            t = Tracked(req=req, attempt_id=attempt_id, attempt_no=na.attempt_no, attempts=req.attempts + 1,
                         idempotency_key=self.store.idempotency_key(
                             na.request_key, na.attempt_no, (na.key_fp or "") if na.scoped else ""),
                         model=na.model, body=body, est_credits=est, reserved=est, since=loop_now,
                         submitted_wall=time.time(), key=key)
            self.tracked[attempt_id] = t
            c.credits_reserved += est
            self.host.spawn(self._send(t), name="call")
        c.in_flight = len(self.tracked)
        return len(new)

    async def _prepare(self, req: RequestRecord, key: PooledKey | None = None) -> tuple[dict[str, Any], bool]:
        request = GenerationRequest.model_validate(req.params)
        if request.model != req.model:
            request = request.model_copy(update={"model": req.model})
        if request.local_paths():
            # Files belong to an account: a key's tasks reference only its own uploads.
            own = key.uploader if key is not None else None
            prepare = own.prepare_body if own is not None else self.host.prepare_body
            if prepare is None:
                raise BatchgenError("this request has local reference files and no upload step is available")
            return await prepare(req, request), True
        return request.api_body(), False

    def _defer_unsent(self, req: RequestRecord, error: ApiError) -> None:
        """Preparing the body (uploads) failed before anything was submitted.

        Nothing was charged, so these failures have their own count (per request, this run) instead of
        using up the request's submissions: a flaky Files API on a request's last attempt waits and tries
        again rather than failing it, and repeated failures back off and finally give up."""
        tries = self._prepare_failures.get(req.key, 0) + 1
        self._prepare_failures[req.key] = tries
        if is_transient(error):  # a failed call, not a refusal: nothing about this request
            delay = self.host.call_failed(error, tries)
            self.store.defer(req.key, time.time() + delay, code_of(error), error.message)
            return
        d = decide(error, tries, max(self.cfg.max_attempts, PREPARE_MAX_TRIES), self.host.rng, self.cfg.time_scale)
        code, message = code_of(error), error.message
        if d.action is Action.STOP:
            stop = self.host.drain if d.finish_paid else self.host.halt
            stop(StopReason.AUTH, f"{error}: {d.why}")
        elif d.action is Action.RETRY:
            self.store.defer(req.key, time.time() + d.delay_s, code, message)
        else:
            self.store.fail(req.key, code, message)
            self.host.on_failed(req.key, code, message)

    async def resender(self) -> None:
        """Sends again, with the same idempotency key, attempts whose submit got no answer."""
        assert self._loop is not None
        resends = self.resends
        while await resends.until_due(self._loop.time, lambda: self.host.halting):
            _, _, attempt_id = resends.pop()
            t = self.tracked.get(attempt_id)
            if t is not None and t.task_id is None:
                self.host.spawn(self._send(t), name="call")

    async def _send(self, t: Tracked) -> None:
        def on_wire() -> None:
            t.on_wire = True

        try:
            snap = await self.host.client_for(t).submit(t.body, idempotency_key=t.idempotency_key, on_wire=on_wire)
        except ApiError as error:
            t.on_wire = False  # answered (a timeout or a 5xx sets `unanswered`, kept for good)
            self._submit_failed(t, error)
            return
        self.host.api_health.ok()
        # Committed with the other answers of this loop turn, in one transaction; nothing waits on the id
        # (poll, outcome) until that commit is done.
        self._answered.append((t, snap))
        if self._flush_handle is None:
            assert self._loop is not None
            self._flush_handle = self._loop.call_soon(self.flush_answered)

    def flush_answered(self) -> None:
        """Commit the task ids answered since the last flush, then start watching them."""
        self._flush_handle = None
        batch, self._answered = self._answered, []
        if not batch:
            return
        try:
            self.store.record_tasks([(t.attempt_id, snap.id, snap.credits_reserved, snap.replayed)
                                     for t, snap in batch])
        except LocalFaultError as error:
            # Not committed: the attempts stay `sending` on disk, and the next run resends them with the same
            # idempotency key, which gets these very tasks back.
            self.host.local_fault(error)
            return
        except BaseException as error:  # a bug: stop, do not lose it in the loop's exception handler
            self.host.internal_error(error)
            return
        for t, snap in batch:
            self._accepted(t, snap)

    def _accepted(self, t: Tracked, snap: TaskSnapshot) -> None:
        """The task id is on disk: count it, and put the task in the poll schedule (or apply its final answer)."""
        assert self._loop is not None
        reserved = snap.credits_reserved if snap.credits_reserved is not None else t.est_credits
        t.task_id = snap.id
        # max_wait bounds how long a task is polled: it starts now, not when the submit was first tried (a
        # submit that met 429s or 5xx before it was accepted has not used up its task's polling time).
        t.since = self._loop.time()
        self.counters.credits_reserved += reserved - t.reserved
        t.reserved = reserved
        self.counters.submitted += 1
        if snap.replayed:
            self.counters.replayed += 1
        self.host.emit("submitted", {"key": t.req.key, "attempt": t.attempt_no, "model": t.model,
                                     "task_id": snap.id, "replayed": snap.replayed})
        self.host.watch(t, snap)

    def _submit_failed(self, t: Tracked, error: ApiError) -> None:
        """A submit call failed. Transient (429, 5xx, timeout, drop): the same attempt is sent again with the
        same key, however often, never charged to max_attempts. Otherwise it is the API's verdict."""
        assert self._loop is not None
        code, message = code_of(error), error.message
        if is_transient(error):
            t.submit_tries += 1
            if error.status != 429 and not isinstance(error, ConnectError):
                t.unanswered = True  # the task may exist: with several keys, only this key may send it again
            delay = self.host.call_failed(error, t.submit_tries)
            # Same attempt, same key: if the server did create the task, the resend gets it back.
            self.store.retry_submit(t.attempt_id, t.req.key, time.time() + delay, code, message)
            self.resends.push(self._loop.time() + delay, t.attempt_id)
            return
        self.host.api_health.ok()  # the API answered, and said no to this request
        d = decide(error, 1, self.cfg.max_attempts, self.host.rng, self.cfg.time_scale)
        if d.action is Action.STOP and t.key is not None and self.keys.several:
            # Refused by this key's account: only this key may send it again if it may exist (its
            # idempotency scope), so it is left open for a run where the key works.
            self.keys.refused(t.key, error)
            if not self._refused_unsent(t, code, message):
                self.keys.leave_open(t.req.key, t.key.name)
            return
        if d.action is Action.STOP and d.finish_paid:
            # The account takes no new work (402) but its tasks still run: they are polled and downloaded,
            # already paid for, before the run stops. One that may exist stays `sending`, for the next run to
            # send again with the same key.
            self.keys.refused_alone(t.key, error)
            self._refused_unsent(t, code, message)
            self.host.drain(StopReason.AUTH, f"{error}: {d.why}")
            return
        if d.action is Action.STOP:
            # Left as `sending`: the next run sends it again with the same key once the cause is fixed.
            self.keys.refused_alone(t.key, error)
            self.host.halt(StopReason.AUTH, f"{error}: {d.why}")
            return
        self.host.finish_tracking(t)
        self.store.record_outcomes([Outcome(t.attempt_id, t.req.key, "failed", error_code=code,
                                            error_message=message)])
        self.host.on_failed(t.req.key, code, message)


    def _refused_unsent(self, t: Tracked, code: str, message: str) -> bool:
        """A submit the account refused (401/402) leaves the table of tasks in flight and its credits go back.
        No task was made unless an earlier send of this attempt went unanswered: then False and the attempt
        stays as it is (its credits still reserved against the cap: the task may be charged); else its request
        is pending again with the attempt unused, and True."""
        may_exist = t.unanswered or t.resumed
        self.host.finish_tracking(t, still_open=may_exist)
        if self.pool is not None:
            self.pool.refund(t.key, t.est_credits)
        if may_exist:
            return False
        self.store.record_outcomes([Outcome(t.attempt_id, t.req.key, "requeue", error_code=code,
                                            error_message=message, not_before=time.time(), consume_attempt=False)])
        self.host.on_requeued(t.req.key, code, 0.0, None)
        return True


def _estimate(model: str, n: int) -> float:
    info = catalog.get(model)
    return info.credits_for(n) if info else 0.0


def _min_opt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
