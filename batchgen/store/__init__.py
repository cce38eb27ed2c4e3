"""The run state of a job: every request, attempt, image and run, committed before anything depends on it.

`open_store(db, job)` picks the backend from the `--db` value (a path: SQLite; a postgresql:// URL:
PostgreSQL); `BaseStore` (base.py) is the interface both implement; the records they exchange are in
records.py and re-exported here.
"""

from batchgen.store.base import BaseStore
from batchgen.store.records import (
    OPEN_ATTEMPT_STATES,
    AttemptRecord,
    AttemptState,
    CreditTotals,
    ImageRecord,
    NewAttempt,
    Outcome,
    RequestRecord,
    RunnerInfo,
    SyncResult,
    UploadRecord,
    idempotency_key,
)

__all__ = [
    "OPEN_ATTEMPT_STATES", "AttemptRecord", "AttemptState", "BaseStore", "CreditTotals", "ImageRecord",
    "NewAttempt", "Outcome", "RequestRecord", "RunnerInfo", "SyncResult", "UploadRecord", "idempotency_key",
]
