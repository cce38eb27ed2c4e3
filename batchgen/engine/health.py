"""Is the service answering? The run-wide view of failed calls, for the rule in `errors.decide()`.

A failed call is retried in place (errors.py); what this module adds is the view across calls that no single
call has. One failed call among many successes is noise: retry it soon. When *every* call has been failing
for `persistent_after_s`, the service looks down: the reference's long waits apply, so an outage is not met
with a storm (botocore's retry quota does the same with tokens). When every call has been failing for the
run's `patience_s`, the run stops resumably (exit 3): nothing about the requests is known to be wrong, so
nothing is failed; the next run picks up where this one stopped.

A refused connection (nothing listens: network down, wrong `--api-base`, the server restarting) is the
clearest outage signal there is, so a streak made only of those stops sooner, after
`refused_patience_s`.

Times are the loop's clock (seconds); the class holds no timers and does no I/O, so it is tested with plain
numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchgen.errors import PERSISTENT_AFTER_S, ApiError, ConnectError
from batchgen.units import plural

DEFAULT_PATIENCE_S = 300.0
REFUSED_PATIENCE_S = 60.0


@dataclass
class CallHealth:
    """Failures since the last successful call, and since when. One per service (the API, media hosts)."""

    name: str = "the API"
    patience_s: float = DEFAULT_PATIENCE_S
    persistent_after_s: float = PERSISTENT_AFTER_S
    refused_patience_s: float = REFUSED_PATIENCE_S
    failing_since: float | None = None  #: loop time of the first failure since the last success
    streak: int = 0  #: failed calls since the last success
    only_refused: bool = True  #: every failure of the streak was a refused connection
    last_error: ApiError | None = None
    failures: int = 0  #: failed calls this run, all told

    @classmethod
    def scaled(cls, name: str, patience_s: float, time_scale: float) -> CallHealth:
        """Durations in emulated seconds against a time-scaled emulator."""
        return cls(name=name, patience_s=patience_s * time_scale,
                   persistent_after_s=PERSISTENT_AFTER_S * time_scale,
                   refused_patience_s=min(patience_s, REFUSED_PATIENCE_S) * time_scale)

    def ok(self) -> None:
        """A call was answered (any answer that is not a transient fault)."""
        self.failing_since = None
        self.streak = 0
        self.only_refused = True

    def failed(self, now: float, error: ApiError) -> None:
        self.failures += 1
        self.streak += 1
        self.last_error = error
        if self.failing_since is None:
            self.failing_since = now
            self.only_refused = True
        self.only_refused = self.only_refused and isinstance(error, ConnectError)

    def failing_for_s(self, now: float) -> float:
        return 0.0 if self.failing_since is None else max(0.0, now - self.failing_since)

    def persistent(self, now: float) -> bool:
        """Every call has been failing long enough that the reference's long waits apply."""
        return self.failing_for_s(now) >= self.persistent_after_s

    def patience_left_s(self, now: float) -> float:
        """Seconds until a streak that goes on failing would stop the run."""
        limit = min(self.patience_s, self.refused_patience_s) if self.only_refused else self.patience_s
        return max(0.0, limit - self.failing_for_s(now))

    def exhausted(self, now: float) -> str | None:
        """Why the run should stop now (every call failing past the patience), or None."""
        failing = self.failing_for_s(now)
        if self.failing_since is None or self.streak < 2:
            return None
        limit = min(self.patience_s, self.refused_patience_s) if self.only_refused else self.patience_s
        if failing < limit:
            return None
        last = f" (last: {self.last_error})" if self.last_error is not None else ""
        if self.only_refused:
            return (f"cannot reach {self.name}: every call for {failing:.3g}s was refused{last}; nothing was lost: "
                    "check the network or --api-base/--files-base and run again")
        return (f"{self.name} has failed every call for {failing:.3g}s ({plural(self.streak, 'call')}){last}; "
                "nothing was failed or lost: run again when the service is back")
