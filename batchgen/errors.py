"""batchgen's exceptions, and the one table that decides what happens after a failure.

The tree::

    BatchgenError                 anything batchgen reports to a user (the CLI catches only these)
    ├── UserInputError            bad input; nothing was sent (exit 2)
    │   ├── ManifestError         a manifest with problems; carries every Problem found
    │   └── ConfigError           missing key, bad flag value, unreadable path
    │   └── StoreFormatError      a --db that is not a batchgen database, or one from a newer batchgen
    ├── StoreLockedError          another run holds the database (exit 3: try again later)
    ├── StoreUnavailableError     the shared (PostgreSQL) database cannot be reached (exit 3, resumable)
    ├── RunStoppedError           the run must stop as a whole, resumably (exit 3)
    │   └── LocalFaultError       this machine failed us: disk full, read-only or vanished folder,
    │                             a database that cannot be written
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
import os
import random
from dataclasses import dataclass, field

from batchgen.units import plural

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
            lines.append(f"... and {plural(truncated, 'more problem')}")
        super().__init__("\n".join(lines))


class ConfigError(UserInputError):
    pass


class StoreFormatError(UserInputError):
    """The database file is not one batchgen can use (another program's file, damaged, or newer); it is
    left untouched."""


class StoreLockedError(BatchgenError):
    exit_code = 3


class StoreUnavailableError(BatchgenError):
    """The shared database cannot be reached (or went away mid-run): nothing is lost, run again (exit 3)."""

    exit_code = 3


class RunStoppedError(BatchgenError):
    """The whole run stops and can be resumed once the cause is fixed (401, 402, policy pause)."""

    exit_code = 3


class LocalFaultError(RunStoppedError):
    """A fault of this machine, not of the request: no space left, a read-only or vanished folder, a database
    that cannot be written. The run stops resumably; `path` and `cause` say where and what."""

    def __init__(self, what: str, path: str, cause: BaseException | str) -> None:
        self.what = what
        self.path = path
        self.cause = cause if isinstance(cause, str) else describe_os_error(cause)
        super().__init__(f"{what} {path}: {self.cause}")


def describe_os_error(error: BaseException) -> str:
    """An OSError (or sqlite3 error) as a short human sentence, without a traceback."""
    import errno

    if isinstance(error, OSError) and error.errno is not None:
        names = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
                 errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.ENOENT: "the folder does not exist (removed or unmounted?)",
                 errno.EDQUOT: "the disk quota is exceeded", errno.EIO: "an input/output error"}
        return names.get(error.errno, error.strerror or str(error))
    return str(error) or type(error).__name__


def listen_error(host: str, port: int, error: OSError) -> ConfigError:
    """A server of ours (`batchgen review`, `batchgen emulator`) that cannot listen: which flag to change,
    without a traceback (exit 2)."""
    import errno
    import socket

    if isinstance(error, socket.gaierror):  # an unknown --host; its errno is not an errno
        reason = error.strerror or str(error)
    else:  # asyncio wraps the bind error in a long sentence that repeats the address
        reason = os.strerror(error.errno) if error.errno else str(error)
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        advice = "check --host (127.0.0.1 is this machine only)"
    else:
        advice = "choose another --port (0 picks a free one)"
    shown = f"[{host}]" if ":" in host else host
    return ConfigError(f"cannot listen on {shown}:{port}: {reason}; {advice}")


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
    # For STOP: the account refuses new work but its tasks still run and can be polled (no credits), so the
    # run stops submitting and lets the tasks it paid for finish and download before it stops.
    finish_paid: bool = False


# HTTP statuses on a call (submit, poll, download, upload).
HTTP_RULES: dict[int, Rule] = {
    400: Rule(Action.FAIL, why="bad request; the API's message says which field"),
    401: Rule(Action.STOP, why="invalid API key; fix EVOLINK_API_KEY and run again"),
    402: Rule(Action.STOP, why="insufficient credits; top up and run again", finish_paid=True),
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
    finish_paid: bool = False  # a STOP that lets the tasks in flight finish (the rule's `finish_paid`)


# --- failed calls ---------------------------------------------------------------------------------
# A call that failed with a RETRY row of the table (HTTP 408/429/5xx, a timeout, a dropped or refused
# connection) says nothing about the request it carried: it is retried in place, however often, and never
# uses up the request's max_attempts. While other calls succeed, the wait is a short capped exponential
# backoff with full jitter (botocore's "standard" mode); once every call has been failing for
# PERSISTENT_AFTER_S the service looks down and the reference's long waits apply (1 minute for 500,
# 1-2 minutes for 503); after the run's patience the run stops, resumably (the scheduler's call).
CALL_BACKOFF_BASE_S = 0.5
CALL_BACKOFF_CAP_S = 20.0
PERSISTENT_AFTER_S = 30.0


def is_transient(error: ApiError) -> bool:
    """True when a failed call is retried in place: the table's RETRY rows for calls."""
    return rule_for(error).action is Action.RETRY


def backoff_s(rule: Rule, attempt: int, rng: random.Random | None = None) -> float:
    """The reference's wait before retry number `attempt` (1 = first retry): exponential, capped, with
    jitter over the upper half so a burst of failures does not come back as a herd."""
    base = min(rule.max_wait_s, rule.wait_s * (rule.growth ** max(0, attempt - 1)))
    r = (rng or random).random()
    return base * (0.5 + 0.5 * r)


def call_backoff_s(tries: int, rng: random.Random | None = None) -> float:
    """Full jitter: uniform over [0, min(cap, base * 2^(tries-1))]; `tries` counts this call's failures."""
    ceiling = min(CALL_BACKOFF_CAP_S, CALL_BACKOFF_BASE_S * (2.0 ** min(30, max(0, tries - 1))))
    return ceiling * (rng or random).random()


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
    *,
    persistent: bool = False,
) -> Decision:
    """What to do after a failure: the one retry decision of batchgen.

    * A **task error code** (a task that ended `failed`) is the API's verdict on the request: its row says
      retry (with the reference's wait, until `max_attempts` submissions have been made), fall back to
      another model, or fail.
    * An **ApiError on a call** (submit, poll, download, upload, credits): a RETRY row is a transient fault
      that says nothing about the request, so it is always retried and `max_attempts` does not apply;
      `attempt` is then how many times this call has failed. The wait is a short full-jitter backoff, or the
      reference's long wait when `persistent` (every call has been failing for a while). A Retry-After the
      server sent is honoured (plus a little positive jitter). Other rows are the API's verdict (400: fail
      with its message; 401: stop the run; 402: stop submitting, let the tasks in flight finish, stop).

    `time_scale` shrinks our own waits (runs against a time-scaled emulator); a server's Retry-After is
    already in its own time and is not scaled again.
    """
    rule = rule_for(error)
    if rule.action is not Action.RETRY:
        return Decision(rule.action, 0.0, rule.why, finish_paid=rule.finish_paid)
    r = (rng or random).random
    if isinstance(error, ApiError):
        own_s = backoff_s(rule, attempt, rng) if persistent else call_backoff_s(attempt, rng)
        delay = own_s * time_scale
        if error.retry_after_s is not None:
            delay = max(delay, error.retry_after_s * (1.0 + 0.2 * r()))
        return Decision(Action.RETRY, delay, rule.why)
    if attempt >= max_attempts:
        return Decision(Action.FAIL, 0.0, f"{rule.why}; gave up after {attempt} attempt(s)")
    return Decision(Action.RETRY, backoff_s(rule, attempt, rng) * time_scale, rule.why)


def code_of(error: ApiError) -> str:
    """The code a failed call is recorded under: the API's own, else `http_<status>` or `transport_error`."""
    if error.code and not error.code.isdigit():
        return error.code
    if isinstance(error, HttpError) and error.status is not None:
        return f"http_{error.status}"
    return "transport_error" if error.status is None else f"http_{error.status}"
