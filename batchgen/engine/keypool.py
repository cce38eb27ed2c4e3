"""Several API keys in one run: per key a client, a rate controller, a balance and a state (issue 15).

Why: a catalogue job is bounded by one key's request budget and one account's balance. With several keys
the run spreads new submissions over them, so three keys of equal limit finish in about a third of the
time, and a key that is revoked or runs dry mid-run does not stop the job.

What belongs to a key, and why it matters:

* **its own `EvolinkClient` and `AdaptiveLimiter`** — the API limits each key separately, so each key is
  paced and backed off on its own 429s; `--rate`/`run.rate` is the rate of each key unless the keys file
  gives one (`rate=10/s`).
* **its tasks and files** — tasks and uploads belong to the account that made them: a task is polled and its
  results re-fetched only with the key that created it (the store records the key's fingerprint per
  attempt), and a file uploaded with one key is referenced only by tasks of the same key (uploads.py).
* **its balance** — read once at the start (`/v1/credits`); the pool counts what this run has put on the
  key since (estimates) and does not assign a submission the key cannot cover.
* **its state** — `active`, `revoked` (401: nothing more can be done with it, not even polls) or
  `out_of_credits` (402: no new submissions, but its tasks in flight are still polled).

Assignment (`pick`): among the active keys whose balance covers the estimate, the one whose next free slot
comes first, where each assignment moves a key's slot on by 1/(its current rate) — a weighted round-robin
in proportion to the keys' rates (their limiters' *current* rates, so a key slowed by 429s gets less).
`--concurrency` stays the job's total and `--max-credits` the job's total across keys; the scheduler keeps
both. A key is named in messages by its label, else its fingerprint — never by the key.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchgen.engine.keyfile import KeySpec

if TYPE_CHECKING:
    from batchgen.api.client import EvolinkClient
    from batchgen.engine.ratelimit import AdaptiveLimiter
    from batchgen.units import Rate

_EPSILON = 1e-9


class KeyState(enum.StrEnum):
    ACTIVE = "active"  # takes new submissions
    REVOKED = "revoked"  # 401: no calls at all any more; its tasks in flight are left for a run that has it working
    OUT_OF_CREDITS = "out_of_credits"  # 402: no new submissions; its tasks in flight are still polled


def refusal_state(status: int | None) -> KeyState:
    """The state a key is left in by the API refusing it: 401 revoked (or invalid), 402 out of credits."""
    return KeyState.REVOKED if status == 401 else KeyState.OUT_OF_CREDITS


@dataclass(eq=False)
class PooledKey:
    """One key of the pool and everything this run knows about it."""

    spec: KeySpec
    client: EvolinkClient
    limiter: AdaptiveLimiter
    state: KeyState = KeyState.ACTIVE
    reason: str | None = None  # why it left the pool (the API's message; never the key)
    balance: float | None = None  # remaining credits at the balance check (None: unknown)
    committed: float = 0.0  # credits (estimated) this run has put on the key since the balance check
    submitted: int = 0  # submissions assigned to it this run
    uploader: Any = None  # its Files API uploads (uploads.Uploader), set by the runner
    _next_at: float = field(default=0.0, repr=False)

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    @property
    def label(self) -> str | None:
        return self.spec.label

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def can_poll(self) -> bool:
        """Polls and result re-fetches still work with it (everything but a revoked key)."""
        return self.state is not KeyState.REVOKED

    def covers(self, credits: float) -> bool:
        """Its balance (as far as this run knows) covers `credits` more; unknown balances cover anything."""
        return self.balance is None or self.balance - self.committed + _EPSILON >= credits


class KeyPool:
    """The keys of a run, in the order given; see the module docstring."""

    def __init__(self, keys: Iterable[PooledKey]) -> None:
        self.keys = list(keys)
        if not self.keys:
            raise ValueError("a key pool needs at least one key")
        self._by_fp = {k.fingerprint: k for k in self.keys}

    @classmethod
    async def open(cls, stack: contextlib.AsyncExitStack, specs: list[KeySpec], api_base: str, files_base: str,
                   rate: Rate, *, poll_grace_max_s: float = 10.0) -> KeyPool:
        """One client and one limiter per key, entered on `stack` (closed with it)."""
        from batchgen.api.client import EvolinkClient
        from batchgen.engine.ratelimit import AdaptiveLimiter

        keys = []
        for spec in specs:
            limiter = AdaptiveLimiter(spec.rate or rate, poll_grace_max_s=poll_grace_max_s)
            client = await stack.enter_async_context(EvolinkClient(api_base, files_base, spec.key, limiter=limiter))
            keys.append(PooledKey(spec, client, limiter))
        return cls(keys)

    @property
    def single(self) -> bool:
        """One key: everything behaves exactly as before issue 15 (idempotency keys, stop on 401/402)."""
        return len(self.keys) == 1

    @property
    def active(self) -> list[PooledKey]:
        return [k for k in self.keys if k.state is KeyState.ACTIVE]

    def get(self, fingerprint: str | None) -> PooledKey | None:
        """The key with this fingerprint, if this run has it (None: the key of a pre-issue-15 attempt in a
        one-key run is that key)."""
        if fingerprint is None:
            return self.keys[0] if self.single else None
        return self._by_fp.get(fingerprint)

    def pick(self, credits: float, now: float) -> PooledKey | None:
        """The active key that should take the next submission (estimated `credits`), or None when no
        active key can cover it."""
        best: PooledKey | None = None
        for k in self.active:
            if k.covers(credits) and (best is None or max(now, k._next_at) < max(now, best._next_at)):
                best = k
        if best is not None:
            best._next_at = max(now, best._next_at) + 1.0 / max(best.limiter.effective_rate, _EPSILON)
            best.committed += credits
            best.submitted += 1
        return best

    def refund(self, key: PooledKey | None, credits: float) -> None:
        """A submission assigned to `key` will not be charged (it failed, or went to another key)."""
        if key is not None:
            key.committed = max(0.0, key.committed - credits)

    def fail(self, key: PooledKey, state: KeyState, reason: str) -> bool:
        """Take `key` out of the pool; True when this changed its state (warn once). A revoked key stays
        revoked; an out-of-credits key that is then refused outright becomes revoked."""
        if key.state is state or key.state is KeyState.REVOKED:
            return False
        key.state, key.reason = state, reason
        return True
