"""What becomes of a task that failed: requeued (now, later, or on a fallback model) or failed for good.

The verdict per error code is `errors.decide`'s (the one table of what is retried). What only the run
knows is added here:

* a task whose reference image was one of batchgen's own uploads (expired or deleted) is retried with the
  file uploaded again, within the request's attempts: the user's photo was not at fault;
* content-policy refusals are counted in a row: after `policy_pause_after` of them the run drains, so that a
  bad batch of prompts does not put the account at risk;
* a fallback goes down the chain of models (the request's own model, then the configured fallbacks), each
  once, without using up an attempt.

The scheduler commits the returned outcome (with the others of the same answer, in one transaction) and
only then calls the follow-up, which reports it; nothing is reported before it is on disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from batchgen.engine.runstate import StopReason, Tracked
from batchgen.errors import CONTENT_POLICY_CODE, Action, decide
from batchgen.store.records import Outcome

if TYPE_CHECKING:
    from batchgen.engine.scheduler import Scheduler

FollowUp = Callable[[], None]


def next_fallback(current: str, original: str, fallbacks: list[str]) -> str | None:
    """The model after `current` in the chain (the request's own model, then the fallbacks), or None."""
    chain = [original, *[m for m in fallbacks if m != original]]
    if current in chain:
        rest = chain[chain.index(current) + 1:]
        return rest[0] if rest else None
    return chain[1] if len(chain) > 1 else None


class TaskFailures:
    """The rule for failed tasks in one run, and the one thing it remembers: the content-policy streak."""

    def __init__(self, host: Scheduler) -> None:
        self.host = host
        self.policy_streak = 0

    def succeeded(self) -> None:
        """A task completed: refusals since are no longer "in a row"."""
        self.policy_streak = 0

    def outcome(self, t: Tracked, code: str, message: str) -> tuple[Outcome, FollowUp]:
        """The outcome to commit for a failed task, and what to do once it is committed."""
        host, cfg = self.host, self.host.cfg
        if host.pool is not None:
            host.pool.refund(t.key, t.est_credits)  # a failed task is refunded: the key's balance has it back
        d = decide(code, t.attempts, cfg.max_attempts, host.rng, cfg.time_scale)
        key = t.req.key
        # The uploads in the body are the sending key's own: its uploader judges them.
        check = t.key.uploader.reference_failed if t.key is not None and t.key.uploader else host.reference_failed
        if (code == "image_processing_error" and check is not None
                and t.attempts < cfg.max_attempts and check(t.body, t.submitted_wall)):
            # Not the user's photo but our upload of it (expired or deleted): the next attempt checks it and
            # uploads it again. Bounded by max_attempts, like the regeneration of expired results.
            message = f"{message} (a reference batchgen uploaded may have expired or been deleted; retrying)"
            return (Outcome(t.attempt_id, key, "requeue", error_code=code, error_message=message,
                            not_before=time.time()),
                    lambda: host.on_requeued(key, code, 0.0, None))
        if code == CONTENT_POLICY_CODE:
            self.policy_streak += 1
            if self.policy_streak >= cfg.policy_pause_after:
                host.drain(StopReason.POLICY, f"{self.policy_streak} content-policy refusals in a row: the job is "
                           "paused so the account is not put at risk; review the prompts (batchgen status shows "
                           "them), then run again")
        if d.action is Action.FALLBACK:
            nxt = next_fallback(t.model, t.req.params.get("model", t.model), cfg.fallback_models)
            if nxt is not None:
                return (Outcome(t.attempt_id, key, "requeue", error_code=code, error_message=message,
                                not_before=time.time(), model=nxt, consume_attempt=False),
                        lambda: host.on_requeued(key, code, 0.0, nxt))
            message = f"{message} (no fallback model left)"
        if d.action is Action.RETRY:
            return (Outcome(t.attempt_id, key, "requeue", error_code=code, error_message=message,
                            not_before=time.time() + d.delay_s),
                    lambda: host.on_requeued(key, code, d.delay_s, None))
        return (Outcome(t.attempt_id, key, "failed", error_code=code, error_message=message),
                lambda: host.on_failed(key, code, message))
