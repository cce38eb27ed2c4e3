"""batchgen's exceptions, and the one table that decides what happens after a failure.

The tree::

    BatchgenError                 anything batchgen reports to a user (the CLI catches only these)
    ├── UserInputError            bad input; nothing was sent (exit 2)
    │   ├── ManifestError         a manifest with problems; carries every Problem found
    │   └── ConfigError           missing key, bad flag value, unreadable path
    ├── StoreLockedError          another run holds the database (exit 3: try again later)
    ├── StoreUnavailableError     the shared (PostgreSQL) database cannot be reached (exit 3, resumable)
    ├── RunStoppedError           the run must stop as a whole, resumably (exit 3)
    └── ApiError                  the Evolink API (or a transport to it) said no
        ├── TransportError        timeout, dropped connection, malformed response
        │   └── ConnectError      no connection at all (refused, DNS): the server never saw the call
        └── HttpError             a non-2xx answer; `.status`, `.code`, `.message`, `.retry_after_s`
        └── FilesApiError         the Files API's envelope with success=false (codes 40001...)

`client.py` is the only place that turns aiohttp exceptions and HTTP statuses into these. The retry
decision for an ApiError, or for a failed task's error code, is `decide()`: one pure function over one
table, applied and counted by the scheduler. Nothing else in batchgen decides whether to retry.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

# --- the tree -------------------------------------------------------------------------------------


class BatchgenError(Exception):
    """Base of every error batchgen reports to a user rather than crashing on."""

    exit_code = 1


class UserInputError(BatchgenError):
    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One mistake in a manifest: where it is, which field, what is wrong and what is allowed."""

    file: str
    location: str | None  # "row 17", "line 4", or None for file-level problems
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file + (f" {self.location}" if self.location else "")
        what = f"{self.field}: " if self.field else ""
        return f"{where}: {what}{self.message}"


class ManifestError(UserInputError):
    """Every problem found in a manifest, reported together."""

    def __init__(self, problems: list[Problem], truncated: int = 0) -> None:
        self.problems = problems
        self.truncated = truncated  # problems found beyond the reporting limit
        lines = [str(p) for p in problems]
        if truncated:
            lines.append(f"... and {truncated} more problem(s)")
        super().__init__("\n".join(lines))


class ConfigError(UserInputError):
    pass


class StoreLockedError(BatchgenError):
    exit_code = 3


class StoreUnavailableError(BatchgenError):
    """The shared database cannot be reached (or went away mid-run): nothing is lost, run again (exit 3)."""

    exit_code = 3


class RunStoppedError(BatchgenError):
    """The whole run stops and can be resumed once the cause is fixed (401, 402, policy pause)."""

    exit_code = 3


class ApiError(BatchgenError):
    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        request_id: str | None = None,
        body_excerpt: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.request_id = request_id
        self.body_excerpt = body_excerpt
        prefix = f"HTTP {status}" if status is not None else "transport"
        detail = f" [{code}]" if code else ""
        rid = f" (request id {request_id})" if request_id else ""
        super().__init__(f"{prefix}{detail}: {message}{rid}")


class TransportError(ApiError):
    """No usable HTTP answer: timeout, connection refused or dropped, malformed body."""


class ConnectError(TransportError):
    """No connection could be made at all (refused, unknown host, unreachable network): the server cannot
    have seen the request, so resending it can never pay twice, and it says nothing about the request."""


class HttpError(ApiError):
    pass


class FilesApiError(ApiError):
    """The Files API said no; `.code` holds its numeric code as a string ("40003")."""


# --- the one retry table --------------------------------------------------------------------------


class Action(enum.StrEnum):
    RETRY = "retry"  # try the same request again after `delay_s`
    FAIL = "fail"  # the request fails for good with this error
    STOP = "stop"  # the whole run stops, resumable (bad key, no credits)
    FALLBACK = "fallback"  # submit again with the manifest's fallback model, if it has one


@dataclass(frozen=True)
class Rule:
    action: Action
    # Base wait before the retry, in seconds, from the reference's "Resolution" column.
    wait_s: float = 0.0
    # The wait grows by this factor per attempt (exponential backoff), capped at max_wait_s.
    growth: float = 2.0
    max_wait_s: float = 300.0
    why: str = ""


# HTTP statuses on a call (submit, poll, download, upload).
HTTP_RULES: dict[int, Rule] = {
    400: Rule(Action.FAIL, why="bad request; the API's message says which field"),
    401: Rule(Action.STOP, why="invalid API key; fix EVOLINK_API_KEY and run again"),
    402: Rule(Action.STOP, why="insufficient credits; top up and run again"),
    403: Rule(Action.FAIL, why="the key may not use this model"),
    404: Rule(Action.FAIL, why="not found"),
    408: Rule(Action.RETRY, wait_s=2.0, why="request timeout"),
    409: Rule(Action.FAIL, why="idempotency conflict: same key, different body"),
    413: Rule(Action.FAIL, why="request body too large"),
    422: Rule(Action.FAIL, why="unprocessable request"),
    # 429: the reference says wait 30-60 s; Retry-After, when given, wins.
    429: Rule(Action.RETRY, wait_s=30.0, growth=1.5, max_wait_s=120.0, why="rate limited"),
    500: Rule(Action.RETRY, wait_s=60.0, growth=1.5, max_wait_s=300.0, why="server error"),
    502: Rule(Action.RETRY, wait_s=30.0, growth=1.5, max_wait_s=300.0, why="upstream error"),
    503: Rule(Action.RETRY, wait_s=60.0, growth=1.5, max_wait_s=300.0, why="service unavailable"),
    504: Rule(Action.RETRY, wait_s=30.0, growth=1.5, max_wait_s=300.0, why="gateway timeout"),
}
# Timeouts and dropped connections: retry soon, then back off.
TRANSPORT_RULE = Rule(Action.RETRY, wait_s=2.0, growth=2.0, max_wait_s=120.0, why="network error")
UNKNOWN_HTTP_RULE = Rule(Action.FAIL, why="unexpected HTTP status")

# Task error codes (a task that ended with status "failed"), from the reference's table.
TASK_RULES: dict[str, Rule] = {
    "content_policy_violation": Rule(Action.FAIL, why="rephrase the prompt"),
    "invalid_parameters": Rule(Action.FAIL, why="check parameter values against the model's limits"),
    "image_dimension_mismatch": Rule(Action.FAIL, why="resize the image to the requested aspect ratio"),
    "image_processing_error": Rule(Action.FAIL, why="check the reference image format, size and URL"),
    "model_unavailable": Rule(Action.FALLBACK, why="the model is unavailable; use another"),
    "generation_timeout": Rule(Action.RETRY, wait_s=5.0, why="retry; simplify the prompt if repeated"),
    "quota_exceeded": Rule(Action.RETRY, wait_s=60.0, growth=2.0, max_wait_s=600.0, why="quota exceeded"),
    "resource_exhausted": Rule(Action.RETRY, wait_s=30.0, growth=1.5, max_wait_s=120.0, why="wait, retry"),
    "service_error": Rule(Action.RETRY, wait_s=60.0, growth=1.5, max_wait_s=300.0, why="retry in a minute"),
    "generation_failed_no_content": Rule(Action.RETRY, wait_s=5.0, why="the model returned nothing"),
    "upstream_error": Rule(Action.RETRY, wait_s=60.0, growth=1.5, max_wait_s=300.0, why="retry in a minute"),
    "unknown_error": Rule(Action.RETRY, wait_s=10.0, why="retry; contact support if persistent"),
    # Seen in public clients though not in the reference's table.
    "service_unavailable": Rule(Action.RETRY, wait_s=60.0, growth=1.5, max_wait_s=300.0, why="retry later"),
    "request_cancelled": Rule(Action.FAIL, why="the task was cancelled"),
    "resource_not_found": Rule(Action.FAIL, why="a referenced resource was not found"),
}
UNKNOWN_TASK_RULE = Rule(Action.RETRY, wait_s=30.0, why="unrecognised task error code")

# The code under which a run of refusals pauses the job (repeated hits can get an account blocked).
CONTENT_POLICY_CODE = "content_policy_violation"


@dataclass(frozen=True)
class Decision:
    action: Action
    delay_s: float = 0.0
    why: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def backoff_s(rule: Rule, attempt: int, rng: random.Random | None = None) -> float:
    """Wait before retry number `attempt` (1 = first retry): exponential, capped, with full jitter
    over the upper half so a burst of failures does not come back as a herd."""
    base = min(rule.max_wait_s, rule.wait_s * (rule.growth ** max(0, attempt - 1)))
    r = (rng or random).random()
    return base * (0.5 + 0.5 * r)


def rule_for(error: ApiError | str) -> Rule:
    """The table row for an API error or a task error code."""
    if isinstance(error, str):
        return TASK_RULES.get(error, UNKNOWN_TASK_RULE)
    if isinstance(error, TransportError) or error.status is None:
        return TRANSPORT_RULE
    if isinstance(error, FilesApiError) and error.status == 200:
        # success=false envelopes: storage errors retry, the rest are about the file itself.
        return TRANSPORT_RULE if (error.code or "").startswith("5") else HTTP_RULES[400]
    return HTTP_RULES.get(error.status, UNKNOWN_HTTP_RULE if error.status < 500 else HTTP_RULES[500])


def decide(
    error: ApiError | str,
    attempt: int,
    max_attempts: int,
    rng: random.Random | None = None,
    time_scale: float = 1.0,
) -> Decision:
    """What to do after `attempt` (1-based) failed with `error` (an ApiError or a task error code).

    Retries stop once `max_attempts` attempts have been made; a Retry-After the server sent is honoured
    (with a little jitter on top) instead of the table's wait. `time_scale` shrinks the table's waits
    (runs against a time-scaled emulator); a server's Retry-After is already in its own time and is not
    scaled again.
    """
    rule = rule_for(error)
    if rule.action is not Action.RETRY:
        return Decision(rule.action, 0.0, rule.why)
    if attempt >= max_attempts:
        return Decision(Action.FAIL, 0.0, f"{rule.why}; gave up after {attempt} attempt(s)")
    delay = backoff_s(rule, attempt, rng) * time_scale
    if isinstance(error, ApiError) and error.retry_after_s is not None:
        delay = error.retry_after_s * (1.0 + 0.2 * (rng or random).random())
    return Decision(Action.RETRY, delay, rule.why)
