"""Everything one running emulator knows, in one object the routes share.

Built from an EmulatorConfig; owns the clock, accounts, tasks, uploads, faults, limiter and stats. All
of it is in memory and lives as long as the emulator (a restarted emulator knows no tasks, like a real
service losing its state would not — tests that kill the runner keep the emulator running).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from batchgen.emulator.accounts import Accounts
from batchgen.emulator.clock import Clock
from batchgen.emulator.config import EmulatorConfig
from batchgen.emulator.faults import FaultInjector
from batchgen.emulator.files import FileStore
from batchgen.emulator.ratelimit import Limiter, PerKeyLimiter, SlidingWindowLimiter, TokenBucketLimiter
from batchgen.emulator.stats import Stats
from batchgen.emulator.tasks import TaskBook


@dataclass(frozen=True)
class IdempotentSubmit:
    body_hash: str
    task_id: str


@dataclass
class EmulatorState:
    config: EmulatorConfig
    clock: Clock = field(init=False)
    stats: Stats = field(init=False)
    accounts: Accounts = field(init=False)
    tasks: TaskBook = field(init=False)
    files: FileStore = field(init=False)
    faults: FaultInjector = field(init=False)
    limiter: Limiter | None = field(init=False)
    # (api key, Idempotency-Key) → the submit it first answered.
    idempotency: dict[tuple[str, str], IdempotentSubmit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        config = self.config
        self.clock = Clock(config.time_scale)
        self.stats = Stats()
        self.accounts = Accounts(config.api_keys, config.initial_credits, config.accounts)
        self.tasks = TaskBook(config, self.clock, self.accounts, self.stats)
        self.files = FileStore(config, self.clock, self.accounts, self.stats)
        seed = None if config.seed is None else f"faults|{config.seed}"
        self.faults = FaultInjector(config.faults, config.rules, random.Random(seed))
        self.limiter = _limiter(config.rate_limit, config.rate_limit_burst)
        own = {a.api_key: _limiter(a.rate_limit, config.rate_limit_burst) for a in config.accounts
               if a.rate_limit is not None}
        if own:  # accounts with their own rate (issue 15); the same shape of limit as the shared one
            self.limiter = PerKeyLimiter(self.limiter, {k: v for k, v in own.items() if v is not None})

    def snapshot(self) -> dict[str, Any]:
        """The stats endpoint's body."""
        self.tasks.settle(self.clock.now())
        in_flight = self.stats.tasks_created - (
            self.stats.tasks_completed + self.stats.tasks_failed + self.stats.tasks_cancelled)
        return self.stats.snapshot({
            "tasks_in_flight": in_flight,
            "time_scale": self.config.time_scale,
            "rate_limit": self.config.rate_limit,
            "rate_limit_burst": self.config.rate_limit_burst,
        })


def _limiter(rate: float | None, burst: int | None) -> SlidingWindowLimiter | TokenBucketLimiter | None:
    if rate and burst:
        return TokenBucketLimiter(rate, burst)
    return SlidingWindowLimiter(rate) if rate else None
