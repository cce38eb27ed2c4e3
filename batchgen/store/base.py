"""The store interface: what the scheduler, uploads, status, export and report may ask of a job's state.

Two backends implement it: `sqlite.py` (the embedded default, one file per job, one runner at a time) and
`postgres.py` (a server shared by any number of runners on any number of hosts, several jobs per database).
Callers get one from `open_store()` (open.py) and never learn which it is.

The interface is synchronous on purpose, for both backends. The scheduler is asyncio, but it relies on
every store write happening *between* awaits: a cancellation (a second Ctrl-C, the hard runtime limit) can
then never interrupt a transition halfway, and "committed before anything depends on it" holds by
construction. A query on loopback or a LAN costs well under a millisecond (docs/benchmarks.md), less than
the bookkeeping an async driver would add, so the engine does not wait on the database in any way that
matters. (The issue suggested psycopg's async API; this is the deliberate exception, see docs/scale-out.md.)

Every backend keeps the same promises: the same states and transitions (models.State, AttemptState), every
transition committed before anything depends on it, a task id on disk before anything waits on it, numbered
append-only migrations applied on open.

Multi-runner hooks: `shared` (False here) and `runner_id` (None here) on the store, and the `runners`
ledger; with SQLite the file lock guarantees one runner, so its ledger never has anything to take over.

Ledgers (one concern each, an interface apart from its implementations, held by the store):

* `uploads` (`UploadLedger`, uploads.py): the files batchgen uploaded through the Files API (issue 6).
* `reviews` (`ReviewLedger`, reviews.py): the images set aside, people's decisions and the requeue of
  rejected requests (issue 16).
* `run_log` (`RunLog`, runlog.py): one row per `batchgen run`.
* `key_states` (`KeyStates`, keystates.py): each API key's last known state, by fingerprint (issue 15).
* `runners` (`Runners`, runners.py): who runs this job — the run lock or registration and heartbeat, the
  live runners, the job's elapsed time, taking over the requests of runners whose lease expired.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from batchgen.store.keystates import KeyStates
from batchgen.store.records import (
    AttemptRecord,
    CreditTotals,
    ImageRecord,
    NewAttempt,
    Outcome,
    RequestRecord,
    SyncResult,
)
from batchgen.store.reviews import ReviewLedger
from batchgen.store.runlog import RunLog
from batchgen.store.runners import Runners
from batchgen.store.uploads import UploadLedger

if TYPE_CHECKING:
    from pathlib import Path

    from batchgen.manifest.load import Manifest


class BaseStore(abc.ABC):
    """The run state of one job. Opening migrates the schema; every method commits what it changes."""

    store_id: str
    # True when several runners may share the job (the scheduler then runs its takeover hook).
    shared: bool = False
    runner_id: str | None = None

    # -- ledgers: one concern each, set by every backend's __init__ (see the module docstring) -------------

    uploads: UploadLedger  # the Files API uploads of the job (issue 6)
    reviews: ReviewLedger  # images set aside, people's decisions, rejected requests requeued (issue 16)
    run_log: RunLog  # one row per `batchgen run`: when it ran, why it ended, its summary
    key_states: KeyStates  # each API key's last known state and its use, by fingerprint (issue 15)
    runners: Runners  # who runs this job: run lock or registration and heartbeat, live runners, takeover

    # -- plumbing -----------------------------------------------------------------------------------

    def __enter__(self) -> BaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the state lives, safe to print (a path, or a URL without its password) plus the job."""

    @property
    @abc.abstractmethod
    def target(self) -> str:
        """What `open_store()` was given (a path or a URL, secrets included: never print it)."""

    @property
    def job_name(self) -> str | None:
        """The job this store is scoped to, where the backend holds several (None: the file is the job)."""
        return None

    @abc.abstractmethod
    def schema_version(self) -> int: ...

    @abc.abstractmethod
    def applied_migrations(self) -> list[str]: ...

    # -- job and sync -------------------------------------------------------------------------------

    @abc.abstractmethod
    def job_record(self) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def sync(self, manifest: Manifest, out_dir: Path | str | None = None) -> SyncResult: ...

    # -- reads --------------------------------------------------------------------------------------

    @abc.abstractmethod
    def counts(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def credit_totals(self) -> CreditTotals: ...

    @abc.abstractmethod
    def image_totals(self) -> tuple[int, int]: ...

    @abc.abstractmethod
    def failures_by_code(self, messages_per_code: int = 3) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def iter_requests(self, states: Iterable[str] | None = None,
                      with_history: bool = True) -> Iterator[RequestRecord]: ...

    @abc.abstractmethod
    def field_names(self) -> tuple[list[str], list[str]]: ...

    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None: ...

    @abc.abstractmethod
    def set_meta(self, key: str, value: str) -> None: ...

    @abc.abstractmethod
    def last_change(self) -> float: ...

    @abc.abstractmethod
    def get_request(self, key: str) -> RequestRecord | None: ...

    @abc.abstractmethod
    def images_for(self, key: str) -> list[ImageRecord]: ...

    @abc.abstractmethod
    def images_since(self, since: float) -> list[ImageRecord]:
        """The saved images recorded at or after `since` (wall-clock seconds). One pass over the images, no
        join: a million-image job is read in a tenth of a second (with its requests' states, four seconds)."""

    @abc.abstractmethod
    def reopen_downloads(self, keys: Sequence[str]) -> int:
        """Done requests among `keys` back to `completed`: the next run checks each image with `has_image`
        and downloads again what is not stored (its attempt's result URLs); how many were reopened."""

    @abc.abstractmethod
    def sample_images(self, limit: int) -> list[ImageRecord]:
        """Up to `limit` saved images of the job, the oldest and the newest: a cheap look at where they are."""

    @abc.abstractmethod
    def waiting_retry(self, now: float) -> int:
        """Pending requests whose not_before is still ahead (waiting to be retried)."""

    # -- the run engine's transitions ---------------------------------------------------------------

    @abc.abstractmethod
    def next_due(self, limit: int, now: float | None = None) -> list[RequestRecord]: ...

    @abc.abstractmethod
    def next_not_before(self) -> float | None: ...

    @abc.abstractmethod
    def pending_estimate(self) -> float: ...

    @abc.abstractmethod
    def has_pending(self) -> bool: ...

    @abc.abstractmethod
    def open_attempts(self) -> list[tuple[RequestRecord, AttemptRecord]]: ...

    @abc.abstractmethod
    def idempotency_key(self, request_key: str, attempt_no: int, key_fp: str = "") -> str: ...

    @abc.abstractmethod
    def start_attempts(self, items: Sequence[NewAttempt]) -> list[int]: ...

    @abc.abstractmethod
    def record_task(self, attempt_id: int, task_id: str, credits_reserved: float | None, replayed: bool) -> None: ...

    @abc.abstractmethod
    def record_tasks(self, accepted: Sequence[tuple[int, str, float | None, bool]]) -> None:
        """The task ids answered in one loop turn (attempt id, task id, credits reserved, replayed), in one
        transaction: committed before anything waits on any of them."""

    @abc.abstractmethod
    def retry_submit(self, attempt_id: int, request_key: str, not_before: float, code: str | None,
                     message: str | None) -> None: ...

    @abc.abstractmethod
    def record_outcomes(self, outcomes: Sequence[Outcome]) -> None: ...

    @abc.abstractmethod
    def abandon_attempt(self, attempt_id: int, code: str, message: str) -> None: ...

    @abc.abstractmethod
    def release_open_attempts(self, code: str, message: str) -> int: ...

    @abc.abstractmethod
    def abandon_tasks_of(self, key_fps: Sequence[str], code: str, message: str) -> int:
        """Give up the open attempts of `submitted` requests sent with these key fingerprints and requeue
        their requests, without charging them an attempt (`batchgen retry --abandon-tasks-of-key`). Task ids
        stay on the attempts; what the tasks may cost counts as spent. Returns the requests requeued."""

    @abc.abstractmethod
    def update_result_urls(self, attempt_id: int, urls: Sequence[str]) -> None: ...

    @abc.abstractmethod
    def record_image(self, img: ImageRecord, done: bool) -> None: ...

    @abc.abstractmethod
    def record_images(self, saved: Sequence[tuple[ImageRecord, bool]]) -> None:
        """Several saved images in one transaction (`done`: the request is done with that image)."""

    @abc.abstractmethod
    def path_owner(self, paths: Sequence[str]) -> str | None: ...

    @abc.abstractmethod
    def is_live(self, key: str) -> bool:
        """Whether the manifest last synced still produces this request (store/live.py)."""

    @abc.abstractmethod
    def move_image(self, key: str, idx: int, path: str) -> None:
        """Record that an image now lives at `path` (moved aside, or back to its name)."""

    @abc.abstractmethod
    def live_images_under(self, prefix: str) -> list[ImageRecord]:
        """The images of live requests whose path starts with `prefix` (a folder such as `_superseded/`)."""

    @abc.abstractmethod
    def finish_request(self, key: str) -> None: ...

    @abc.abstractmethod
    def requeue(self, key: str, not_before: float, code: str | None, message: str | None, *,
                model: str | None = None, consume_attempt: bool = True) -> None: ...

    @abc.abstractmethod
    def defer(self, key: str, not_before: float, code: str | None, message: str | None) -> None: ...

    @abc.abstractmethod
    def fail(self, key: str, code: str | None, message: str | None) -> None: ...

    @abc.abstractmethod
    def requeue_failed(self, codes: list[str] | None = None) -> int: ...
