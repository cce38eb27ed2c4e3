"""Counters for tests and benchmarks to assert on, served at GET /_emulator/stats.

Plain integers bumped by the routes and the task simulation; `snapshot()` is the JSON shape (documented in
docs/emulator.md). Nothing here decides behaviour.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any

from batchgen.emulator.ratelimit import RateMeter

TIMELINE_BIN_S = 0.1


class Stats:
    def __init__(self) -> None:
        self.started = time.monotonic()
        # API requests per TIMELINE_BIN_S since start: bin -> [accepted, rate limited (429), accepted submits].
        # Bounded by the run's duration, not its size; benchmarks plot it and measure budget use with it.
        self.timeline: defaultdict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
        self.requests: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.api_meter = RateMeter()
        # Per account id (never the key): API calls seen after authentication, and their one-second peak.
        self.account_meters: dict[str, RateMeter] = {}
        self.account_requests: Counter[str] = Counter()
        self.account_rate_limited: Counter[str] = Counter()
        self.account_tasks: Counter[str] = Counter()
        self.api_requests = 0
        self.tasks_created = 0
        self.tasks_completed = 0
        self.tasks_failed = 0
        self.tasks_cancelled = 0
        self.task_errors: Counter[str] = Counter()
        self.images_returned = 0
        self.polls = 0
        self.batch_polls = 0
        self.idempotent_replays = 0
        self.idempotency_conflicts = 0
        self.credits_charged = 0.0
        self.rate_limited = 0
        self.faults: Counter[str] = Counter()
        self.dropped_connections = 0
        self.downloads = 0
        self.uploads = 0
        self.uploads_by_sha256: Counter[str] = Counter()
        self.files_deleted = 0
        self.tasks_not_found = 0  # polls (single or in a batch) of ids this key does not own or nobody does
        self.cross_account_references = 0  # submits referencing another account's upload (refused)

    def request(self, route: str, status: str) -> None:
        self.requests[route][status] += 1

    def api_request(self) -> None:
        self.api_requests += 1
        self.api_meter.hit()

    def account_request(self, account: str) -> None:
        self.account_requests[account] += 1
        meter = self.account_meters.get(account)
        if meter is None:
            meter = self.account_meters[account] = RateMeter()
        meter.hit()

    def api_answered(self, status: int, submit: bool) -> None:
        """One API answer on the timeline: 429s apart from the rest, accepted submissions also counted."""
        row = self.timeline[int((time.monotonic() - self.started) / TIMELINE_BIN_S)]
        if status == 429:
            row[1] += 1
        else:
            row[0] += 1
            if submit and 200 <= status < 300:
                row[2] += 1

    def snapshot(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        by_route = {route: dict(sorted(c.items())) for route, c in sorted(self.requests.items())}
        by_status: Counter[str] = Counter()
        for counts in self.requests.values():
            by_status.update(counts)
        return {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "requests_total": sum(by_status.values()),
            "requests_by_route": by_route,
            "requests_by_status": dict(sorted(by_status.items())),
            "api_requests": self.api_requests,
            "max_requests_in_1s": self.api_meter.peak,
            "rate_limited": self.rate_limited,
            "tasks_created": self.tasks_created,
            "tasks_completed": self.tasks_completed,
            "tasks_failed": self.tasks_failed,
            "tasks_cancelled": self.tasks_cancelled,
            "task_errors": dict(sorted(self.task_errors.items())),
            "images_returned": self.images_returned,
            "polls": self.polls,
            "batch_polls": self.batch_polls,
            "idempotent_replays": self.idempotent_replays,
            "idempotency_conflicts": self.idempotency_conflicts,
            "credits_charged": round(self.credits_charged, 4),
            "faults_injected": dict(sorted(self.faults.items())),
            "dropped_connections": self.dropped_connections,
            "downloads": self.downloads,
            "uploads": self.uploads,
            "uploads_by_sha256": dict(self.uploads_by_sha256),
            "files_deleted": self.files_deleted,
            "tasks_not_found": self.tasks_not_found,
            "cross_account_references": self.cross_account_references,
            "accounts": {acct: {"api_requests": self.account_requests[acct],
                                "max_requests_in_1s": meter.peak,
                                "rate_limited": self.account_rate_limited[acct],
                                "tasks_created": self.account_tasks[acct]}
                         for acct, meter in sorted(self.account_meters.items())},
            "timeline_bin_s": TIMELINE_BIN_S,
            "timeline": [[b, *row] for b, row in sorted(self.timeline.items())],
            **(extra or {}),
        }
