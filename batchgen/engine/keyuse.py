"""The key pool as one run uses it: which key a submission goes out with, what a refused key does to the
run, and the tasks left open because no key of this run may look at them (issue 15).

keypool.py holds the keys (clients, limiters, balances, states) and picks among them; this is the run's
side: a key refused with 401 or 402 leaves the pool with one warning and the run goes on with the others;
a revoked key's tasks in flight cannot be polled by any other key (tasks belong to the account that made
them), so they are left open for a run that has it, and named in the run's result; only when no key is
left does the run drain (exit 3). Tasks of keys this run was not given are left the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchgen.engine.keypool import KeyPool, KeyState, PooledKey, refusal_state
from batchgen.engine.runstate import StopReason
from batchgen.units import credits_text, plural

if TYPE_CHECKING:
    from batchgen.engine.scheduler import Scheduler
    from batchgen.errors import ApiError


class KeyUse:
    """The run's keys: assignment, refusals, and the tasks left for a run with other keys."""

    def __init__(self, host: Scheduler, pool: KeyPool | None) -> None:
        self.host = host
        self.pool = pool
        self.left_open: list[tuple[str, str | None]] = []  # (request key, key name) of tasks no key here can poll

    @property
    def several(self) -> bool:
        return self.pool is not None and not self.pool.single

    def leave_open(self, request_key: str, key_name: str | None) -> None:
        """A task only a key this run lacks (or lost) may look at: left as it is, named at the end."""
        self.left_open.append((request_key, key_name))

    def names(self) -> str:
        """The key names of the tasks left open, each once: "team-a, 3f2a9c01b2d4"."""
        return ", ".join(dict.fromkeys(name or "no key recorded" for _, name in self.left_open))

    def abandon_hint(self) -> str:
        """How to give those tasks up when their key will never work again. Only ever a hint: submitting them
        again may pay twice, so it is the user's choice (store/lost_tasks.py)."""
        named = [name for name in dict.fromkeys(name for _, name in self.left_open) if name]
        if not named:
            return ""
        flags = " ".join(f"--abandon-tasks-of-key {name}" for name in named)
        return (f"; if a key will never work again, `batchgen retry {flags}` gives its tasks up and the next run "
                "submits them with its own keys (paying for them again)")

    def assign(self, est: float, now: float) -> PooledKey | None:
        """With a key pool: the key the next submission goes out with, or None (and the run drains) when no
        key is left that can cover it. One key takes everything, as before (the API says 402 if it must)."""
        pool = self.pool
        if pool is None:
            return None
        if pool.single:
            return pool.keys[0]
        key = pool.pick(est, now)
        if key is None and pool.active:
            left = ", ".join(f"{k.name} {credits_text(k.balance - k.committed)}"
                             for k in pool.active if k.balance is not None)
            self.host.drain(StopReason.BUDGET, "no key has credits left for the next request (about "
                            f"{credits_text(est)}; balances left: {left}); top up a key and run again")
        elif key is None:
            self.no_keys_left()
        return key

    def refused_alone(self, key: PooledKey | None, error: ApiError) -> None:
        """A 401/402 on the run's only key: its state is recorded, so status says why the run stopped
        (the run itself stops or drains: the submit and poll rules decide)."""
        if key is not None:
            self.host.store.key_states.record(key.fingerprint, key.label, refusal_state(error.status).value,
                                              error.message)

    def refused(self, key: PooledKey, error: ApiError) -> None:
        """A 401/402 on `key` in a pool of several: take it out (warn once) and go on with the others; a
        revoked key's tasks in flight are left; with no key left the run drains (exit 3)."""
        assert self.pool is not None
        host = self.host
        state = refusal_state(error.status)
        if self.pool.fail(key, state, error.message):
            others = len(self.pool.active)
            what = "was refused (401: revoked or invalid)" if state is KeyState.REVOKED else "is out of credits (402)"
            host.store.key_states.record(key.fingerprint, key.label, state.value, error.message)
            host.emit("key_failed", {"key": key.name, "state": state.value, "keys_left": others, "message": (
                f"key {key.name} {what}; it leaves the pool and the run goes on with {plural(others, 'other key')}"
                if others else f"key {key.name} {what}; no key is left")})
            if state is KeyState.REVOKED:
                # Its tasks cannot be polled any more: left open for a run where it works. The account may
                # still finish and charge them, so their credits stay reserved against the cap.
                for t in host.tracked_of(key):
                    host.finish_tracking(t, still_open=True)
                    self.leave_open(t.req.key, key.name)
        if not self.pool.active:
            self.no_keys_left()

    def no_keys_left(self) -> None:
        assert self.pool is not None
        reasons = "; ".join(f"{k.name}: {k.state.value}" for k in self.pool.keys)
        # Drain rather than halt: tasks of keys that are only out of credits can still be polled.
        self.host.drain(StopReason.AUTH, f"no API key is left ({reasons}); fix the keys or their balances and "
                        "run again")
