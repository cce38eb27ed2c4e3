"""The records both store backends hand out and take in: plain dataclasses, no database code.

They used to live in `store/sqlite.py`; they are here so the PostgreSQL backend (and everything that reads
a store: scheduler, uploads, status, export, report) shares them without importing a backend. `sqlite.py`
and the package re-export them, so `from batchgen.store.sqlite import RequestRecord` keeps working.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from batchgen.errors import BatchgenError
from batchgen.models import State

IDEMPOTENCY_PREFIX = "bg1"


class AttemptState:
    """States of one submission (text in `attempts.state`)."""

    SENDING = "sending"  # row committed, submit not yet answered: resubmit with the same key on resume
    RUNNING = "running"  # the API returned a task id (committed); poll it
    COMPLETED = "completed"  # the task finished with results
    FAILED = "failed"  # the task (or its submission) failed; the request's state says what happens next
    ABANDONED = "abandoned"  # results unusable (expired URLs) or task lost; superseded by a later attempt


OPEN_ATTEMPT_STATES = (AttemptState.SENDING, AttemptState.RUNNING)

# --- records --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncResult:
    added: int  # requests that became part of the job: new ones, and ones that came back (live.py)
    removed: int  # requests that stopped being part of it (gone from the manifest, whatever their state)
    total: int  # requests of the job now (the live ones)
    skipped: bool = False  # the manifest's fingerprint was unchanged: nothing was expanded
    stale: bool = False  # (shared stores) the job was synced from a newer manifest version: not synced back


@dataclass(frozen=True)
class CreditTotals:
    reserved: float  # held by tasks in flight (their credits_reserved, or the estimate before an answer)
    used: float  # charged by finished tasks

    @property
    def spent(self) -> float:
        return self.reserved + self.used


@dataclass
class AttemptRecord:
    id: int
    request_key: str
    attempt_no: int
    idempotency_key: str
    model: str
    state: str
    submit_tries: int
    task_id: str | None
    submitted_at: float | None
    finished_at: float | None
    credits_estimated: float | None
    credits_reserved: float | None
    credits_used: float | None
    error_code: str | None
    error_message: str | None
    result_urls: list[str]
    replayed: bool
    body: dict[str, Any] | None = None
    key_fp: str | None = None  # fingerprint of the key it was sent with (None: before m006)


@dataclass
class ImageRecord:
    request_key: str
    idx: int
    path: str
    url: str | None
    bytes: int
    sha256: str
    width: int | None
    height: int | None
    format: str | None
    attempt_id: int | None
    created_at: float
    check_status: str | None = None  # automatic checks (m005): passed, failed, None = not checked
    check_reasons: str | None = None


@dataclass
class RequestRecord:
    key: str
    seq: int  # rowid: manifest order
    item_id: str
    variant: dict[str, str]
    metadata: dict[str, str]
    params: dict[str, Any]
    model: str
    n: int
    est_credits: float
    source: str
    state: State
    attempts: int
    attempt_no: int
    not_before: float
    error_code: str | None
    error_message: str | None
    created_at: float | None
    updated_at: float | None
    attempt_rows: list[AttemptRecord] = field(default_factory=list)
    images: list[ImageRecord] = field(default_factory=list)


@dataclass(frozen=True)
class NewAttempt:
    """What the scheduler is about to submit; `start_attempts` commits it before the call."""

    request_key: str
    attempt_no: int
    model: str
    credits_estimated: float
    body: dict[str, Any] | None = None  # kept only when it cannot be rebuilt from params (uploads)
    key_fp: str | None = None  # the key it goes out with; polls and fetches use the same key
    scoped: bool = False  # several keys: the idempotency key carries the key's fingerprint



@dataclass(frozen=True)
class Outcome:
    """What one poll (or a submit answered with a final task) found, for `record_outcomes`.

    kind: "running" (only a changed credits figure), "completed", "requeue" (back to pending at
    `not_before`, optionally with another `model`), "failed" (for good), "left" (nothing to write).
    """

    attempt_id: int
    request_key: str
    kind: str
    result_urls: tuple[str, ...] = ()
    credits_reserved: float | None = None
    credits_used: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    not_before: float = 0.0
    model: str | None = None
    consume_attempt: bool = True


def idempotency_key(request_key: str, attempt_no: int, store_id: str = "", key_fp: str = "") -> str:
    """`bg1-<store id>-<request key>-a<n>`: the same attempt of the same database always sends the same key,
    and no other database ever sends it (16–96 chars of [A-Za-z0-9._-]). With several API keys the key's
    fingerprint joins the scope (`bg1-<store id>-<fp>-<request key>-a<n>`); one key keeps today's format,
    so stores made before issue 15 resume with the keys they sent."""
    scope = f"{store_id}-" if store_id else ""
    if key_fp:
        scope += f"{key_fp}-"
    return f"{IDEMPOTENCY_PREFIX}-{scope}{request_key}-a{attempt_no}"


# Built once: `json.dumps` with non-default options constructs a new JSONEncoder on every call, which cost
# about a tenth of the time of expanding a manifest into the store (two calls per request; issue 8).
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode


def encode_json(value: Any) -> str:
    # Most requests of a CSV job have no matrix variant: skip the encoder for the empty mapping.
    return "{}" if value == {} else _ENCODE(value)



@dataclass
class UploadRecord:
    """One file batchgen uploaded (times are epoch seconds)."""

    file_id: str
    sha256: str
    file_url: str
    expires_at: float
    size: int | None
    mime: str | None
    path: str | None
    uploaded_at: float
    checked_at: float | None = None  # last time its URL was fetched successfully (None: only the upload vouches)
    suspect_at: float | None = None  # a task using it failed with image_processing_error
    deleted_at: float | None = None  # deleted by batchgen, or found gone (expired, deleted elsewhere)
    key_fp: str | None = None  # fingerprint of the key that uploaded it (None: before m006)


@dataclass(frozen=True)
class RunnerInfo:
    """One live `batchgen run` process sharing a job (shared stores only; see postgres.py)."""

    id: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    claimed: int = 0  # requests it holds in flight (open attempts carrying its id)


@dataclass
class SetAsideRecord:
    """An image taken out of the results (m005): its file lives on under _rejected/ in the output folder."""

    request_key: str
    idx: int
    attempt_id: int | None
    path: str  # relative to the output folder
    sha256: str
    bytes: int | None
    width: int | None
    height: int | None
    format: str | None
    why: str  # "quality" (an automatic check failed) or "review" (a person rejected it)
    reason: str | None
    created_at: float


@dataclass
class ReviewRecord:
    """A person's latest decision on one image (m005)."""

    request_key: str
    idx: int
    sha256: str
    attempt_id: int | None
    decision: str  # approve, reject
    reason: str | None
    decided_at: float
    acted_at: float | None  # when a run requeued the request for this reject


class ReviewRefusedError(BatchgenError):
    """A decision that cannot be recorded: the image was replaced meanwhile, or the decision is unknown."""

    exit_code = 2

    def __init__(self, message: str, *, superseded: bool = False) -> None:
        super().__init__(message)
        self.superseded = superseded
