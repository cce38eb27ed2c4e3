"""The uploads ledger: the files batchgen uploaded through the Files API (issue 6), as `store.uploads`.

Local reference images go to the Files API once per content hash, and each upload is committed before
anything relies on it, so a killed run does not upload it again; engine/uploads.py decides what to upload,
reuse, check and delete, and keeps its record here. The ledger also answers the two questions only that
step asks of requests and attempts: which local files the job still needs, and which uploaded URLs tasks in
flight may still fetch. It is an interface apart from its implementations (`sqlite_uploads.py`,
`postgres_uploads.py`) so the store class need not do this job as well, and callers never learn the backend.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any

from batchgen.models import is_remote
from batchgen.store.records import UploadRecord


def local_only(rows: Iterable[Sequence[Any]]) -> list[tuple[str, str]]:
    """(request key, reference) rows read from the requests, keeping the local paths (not http(s) URLs)."""
    return [(k, v) for k, v in rows if isinstance(v, str) and not is_remote(v)]


def urls_of(rows: Iterable[Sequence[Any]]) -> set[str]:
    """The reference URLs of one-column rows read from attempt bodies (a missing mask reads as NULL)."""
    return {v for (v,) in rows if isinstance(v, str)}


class UploadLedger(abc.ABC):
    """The uploads of one job's store; every method commits what it changes."""

    @abc.abstractmethod
    def record(self, rec: UploadRecord) -> None: ...

    @abc.abstractmethod
    def current(self, sha256: str, key_fp: str | None = None, *, legacy: bool = True) -> UploadRecord | None:
        """The newest live upload of this content made with the key `key_fp` (None: any key; `legacy`:
        uploads recorded before keys were, counted as this key's)."""

    @abc.abstractmethod
    def by_url(self, urls: Iterable[str]) -> list[UploadRecord]: ...

    @abc.abstractmethod
    def live(self, key_fp: str | None = None, *, legacy: bool = True) -> list[UploadRecord]: ...

    @abc.abstractmethod
    def mark(self, file_id: str, *, checked_at: float | None = None, suspect_at: float | None = None,
             deleted_at: float | None = None) -> None: ...

    @abc.abstractmethod
    def local_references(self, states: Sequence[str] = ("pending", "submitted")) -> list[tuple[str, str]]: ...

    @abc.abstractmethod
    def open_attempt_urls(self) -> set[str]: ...
