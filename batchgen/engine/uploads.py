"""Local reference images → Files API URLs: each photo uploaded once, never sent stale, quota kept in check.

Why this exists: catalogue edits reference product photos on the user's disk, but the generation API only
takes URLs. Before a request with local paths is submitted, the scheduler calls `Uploader.prepare_body`,
which swaps every local path for the URL of an upload of that file's *content* and returns the body to send.

Upload once. Uploads are keyed by the content's sha256 and committed to the store (`uploads` table) the
moment the Files API answers, before anything else happens, so a photo shared by 500 requests is uploaded
once per run and once across resumed runs. The window left open: a run killed after the Files API stored the
file but before its answer arrived uploads it again on resume; the orphan is not in the store, so batchgen
never deletes it (it is not provably ours) and it expires after 72 hours.
Concurrent requests for one photo wait on one lock per content hash and look at the store again once they
hold it, so they share a single upload (a single flight per content), after an expiry or a doubt too; a
failed upload call leaves the next waiter to try, and a run resumed later finds the committed upload.

Never stale. Files expire 72 hours after upload. A stored upload is reused only while it has more than
`REUSE_MARGIN_S` (one hour, × the run's time scale) left: that covers the submit queue, submit retries with
backoff (≤ 5 minutes), and the task's own processing (polled for ≤ 5 minutes), with room to spare. Closer to
expiry it is uploaded again; the old file is left to expire. Our clock may disagree with the server's, and
someone may delete a file from the dashboard, so an upload made by an *earlier* run is fetched once (GET of
its public URL, no key, no API budget) before this run first uses it; a dead one is uploaded again.
When a task fails with `image_processing_error` and its body used one of our uploads, `reference_failed`
says whether the upload may be to blame (it went stale, or has not been proven fetchable since the task
was sent); then the scheduler requeues the request instead of failing it, the upload is marked suspect, and
the next attempt checks it and uploads it again if it is gone. An upload proven fetchable between the
suspicion and the next send is not to blame: a second failure then fails the request as the retry table says.

Stream, not base64. Local files go through the multipart stream route: the file is read as it is sent, with
no 4/3 base64 inflation and no JSON to build; the type is sniffed from the content. Base64 fits bytes already
in memory, which batchgen never has (references are checked on disk at validation).

Quota. The account holds 100 files (500 for VIP), and batchgen shares it with whatever else the user uploads.
On a 40003 refusal batchgen deletes its *own* uploads (the store's rows, never anything else in the account)
that no pending or in-flight request needs any more — expired ones first, then the oldest — and tries once
more. If nothing of its own can be freed but some of its files are held only by requests that will finish
(tasks in flight, or requests not blocked on the quota themselves), the request waits (`UploadWaitError`;
the scheduler defers it); otherwise it fails with the API's message and the request it blocks.

Per key. Files belong to the account that uploaded them, so with several API keys (keypool.py) each key has
its own Uploader: an upload is recorded with the key's fingerprint, reused only by tasks sent with that key,
and only that key's files are deleted to free that key's quota. A photo used by tasks of two keys is thus
uploaded once per key. Uploads recorded before the fingerprint existed belong to the one key of those runs.

Errors. Everything the client raises is an `ApiError` (with the request and file added to the message), so
the scheduler applies `errors.decide()`: rate limits, 5xx and transport errors retry with backoff; a refusal
about the file itself (too large, wrong type) fails that request. 401/402 stop the run.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchgen.errors import ApiError, BatchgenError, FilesApiError, is_transient
from batchgen.store.base import BaseStore
from batchgen.store.records import RequestRecord, UploadRecord

if TYPE_CHECKING:
    from batchgen.api.client import EvolinkClient
    from batchgen.models import GenerationRequest

log = logging.getLogger(__name__)

REUSE_MARGIN_S = 3600.0  # × time scale: an upload with less than this left is uploaded again before use
QUOTA_WAIT_S = 5.0  # × time scale: how long a request blocked on a full quota waits before trying again
QUOTA_EXCEEDED = "40003"
_HASH_CHUNK = 1024 * 1024


class UploadWaitError(BatchgenError):
    """The file quota is full of batchgen's own files that requests in progress still need: try this request
    again after `delay_s`, once some of them have finished and their files can be deleted."""

    code = "files_quota_wait"

    def __init__(self, message: str, delay_s: float) -> None:
        super().__init__(message)
        self.delay_s = delay_s


class Uploader:
    """Turns a request's local paths into Files API URLs (see the module docstring). One per run."""

    def __init__(self, store: BaseStore, client: EvolinkClient, time_scale: float = 1.0, *,
                 key_fp: str | None = None, legacy: bool = True) -> None:
        """`key_fp`: the fingerprint of `client`'s key (recorded on its uploads); `legacy`: uploads recorded
        without a key count as this key's (true for a one-key run)."""
        self.store = store
        self.client = client
        self.time_scale = time_scale
        self.key_fp = key_fp
        self.legacy = legacy
        self.margin_s = REUSE_MARGIN_S * time_scale
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._digests: dict[tuple[str, int, int], str] = {}
        self._trusted: set[str] = set()  # file ids uploaded or proven fetchable in this run
        self._blocked: set[str] = set()  # request keys waiting for the quota in this run
        self.uploads = 0  # uploads made by this run
        self.deleted = 0  # files deleted by this run to free the quota

    # --- the scheduler's two hooks ----------------------------------------------------------------

    async def prepare_body(self, req: RequestRecord, request: GenerationRequest) -> dict[str, Any]:
        """The API body of `request` with every local path replaced by the URL of a fresh-enough upload."""
        url_for: dict[str, str] = {}
        for path in dict.fromkeys(request.local_paths()):
            url_for[path] = await self.url_for(Path(path), req)
        self._blocked.discard(req.key)
        return request.api_body(url_for=url_for)

    def reference_failed(self, body: dict[str, Any], sent_at: float) -> bool:
        """A task sent at `sent_at` (epoch) with `body` failed with image_processing_error: True when one of
        batchgen's uploads in it may be the cause (then it is marked suspect, and the request is worth another
        attempt, which checks the file and uploads it again if it is gone)."""
        refs = [*(body.get("image_urls") or []), *([body["mask_url"]] if body.get("mask_url") else [])]
        now = time.time()
        to_blame = False
        for row in self.store.uploads.by_url(r for r in refs if isinstance(r, str)):
            current = self.store.uploads.current(row.sha256, self.key_fp, legacy=self.legacy)
            if row.deleted_at is not None or current is None or current.file_id != row.file_id:
                to_blame = True  # already replaced: the next attempt gets the new file
            elif row.expires_at - now <= self.margin_s:
                to_blame = True  # the next attempt uploads it again anyway
            elif row.checked_at is not None and sent_at < row.checked_at:
                # Proven fetchable after this attempt was sent (another request's doubt was checked): no new
                # doubt, but the retry is sent with a checked file, which settles it.
                to_blame = True
            elif row.suspect_at is not None and row.checked_at is not None and row.suspect_at <= row.checked_at:
                continue  # proven fetchable after the last doubt and before this send: the image is the problem
            else:
                self.store.uploads.mark(row.file_id, suspect_at=now)
                self._trusted.discard(row.file_id)
                to_blame = True
        return to_blame

    # --- one file ---------------------------------------------------------------------------------

    async def url_for(self, path: Path, req: RequestRecord) -> str:
        """A URL for the content of `path` that stays valid for at least the margin, uploading if needed."""
        sha256 = await self._digest(path, req)
        async with self._locks[sha256]:
            rec = self.store.uploads.current(sha256, self.key_fp, legacy=self.legacy)
            fresh = rec is not None and rec.expires_at - time.time() > self.margin_s
            if rec is not None and fresh and (rec.file_id in self._trusted or await self._still_there(rec)):
                return rec.file_url
            return (await self._upload(path, sha256, req)).file_url

    async def _digest(self, path: Path, req: RequestRecord) -> str:
        """The content's sha256, cached per (path, size, mtime): 500 rows sharing a photo hash it once."""
        try:
            st = path.stat()
        except OSError as error:
            raise BatchgenError(f'{_who(req)}: local file "{path}" cannot be read: {error.strerror}') from None
        cache_key = (str(path), st.st_size, st.st_mtime_ns)
        digest = self._digests.get(cache_key)
        if digest is None:
            digest = self._digests[cache_key] = await asyncio.to_thread(_sha256_of, path)
        return digest

    async def _still_there(self, rec: UploadRecord) -> bool:
        """Fetch the file's public URL once per run (no key, no API budget); record what we learn."""
        try:
            await self.client.download(rec.file_url)
        except ApiError as error:
            if is_transient(error):
                raise  # a failed call proves nothing about the file: the scheduler tries the request again
            log.info("upload %s of %s is gone (%s); uploading it again", rec.file_id, rec.path, error)
            self.store.uploads.mark(rec.file_id, deleted_at=time.time())
            return False
        self.store.uploads.mark(rec.file_id, checked_at=time.time())
        self._trusted.add(rec.file_id)
        return True

    async def _upload(self, path: Path, sha256: str, req: RequestRecord) -> UploadRecord:
        try:
            try:
                uploaded = await self.client.upload_file(path)
            except FilesApiError as error:
                if error.code != QUOTA_EXCEEDED:
                    raise
                if not await self._free_space():
                    await self._wait_or_fail(error, req, path)
                uploaded = await self.client.upload_file(path)
        except ApiError as error:
            raise _blocking(error, req, path) from error
        # Committed before anything else can happen: a killed run must not upload this again.
        now = time.time()
        rec = UploadRecord(file_id=uploaded.file_id, sha256=sha256, file_url=uploaded.file_url,
                           expires_at=uploaded.expires_at.timestamp(), size=uploaded.file_size,
                           mime=uploaded.mime_type, path=str(path), uploaded_at=now, key_fp=self.key_fp)
        self.store.uploads.record(rec)
        self._trusted.add(rec.file_id)
        self.uploads += 1
        return rec

    # --- quota ------------------------------------------------------------------------------------

    async def _needs(self) -> dict[str, set[str]]:
        """content sha256 → keys of the pending and in-flight requests that reference it."""
        needs: dict[str, set[str]] = defaultdict(set)
        for key, ref in self.store.uploads.local_references(("pending", "submitted")):
            path = Path(ref)
            try:
                st = path.stat()
            except OSError:
                continue  # gone from disk: that request fails when prepared; it needs no upload
            cache_key = (str(path), st.st_size, st.st_mtime_ns)
            digest = self._digests.get(cache_key)
            if digest is None:
                digest = self._digests[cache_key] = await asyncio.to_thread(_sha256_of, path)
            needs[digest].add(key)
        return needs

    async def _free_space(self) -> int:
        """Delete batchgen's own uploads that nothing pending or in flight needs (expired first, then the
        oldest). Returns how many live files were deleted (expired ones no longer count against the quota)."""
        needs = await self._needs()
        in_use = self.store.uploads.open_attempt_urls()
        now = time.time()
        mine = self.store.uploads.live(self.key_fp, legacy=self.legacy)  # this key's files, oldest first
        current = {u.sha256: u.file_id for u in mine}  # the newest wins
        candidates = [u for u in mine
                      if u.file_url not in in_use and not (u.sha256 in needs and current[u.sha256] == u.file_id)]
        candidates.sort(key=lambda u: (u.expires_at > now, u.uploaded_at))
        freed = 0
        for u in candidates:
            try:
                await self.client.delete_file(u.file_id)
            except FilesApiError as error:
                if error.status not in (404, 410):
                    raise
                # Already gone (expired, or deleted elsewhere): nothing freed, but nothing to keep either.
            else:
                if u.expires_at > now:
                    freed += 1
                self.deleted += 1
            self.store.uploads.mark(u.file_id, deleted_at=time.time())
            self._trusted.discard(u.file_id)
        if candidates:
            log.info("file quota full: deleted %d of batchgen's own uploads no request needs any more", freed)
        return freed

    async def _wait_or_fail(self, error: FilesApiError, req: RequestRecord, path: Path) -> None:
        """Nothing could be freed now. Wait if some of our files are held only by requests that will finish
        without needing a new upload; otherwise fail this request with the API's message."""
        self._blocked.add(req.key)
        needs = await self._needs()
        now = time.time()
        live = [u for u in self.store.uploads.live(self.key_fp, legacy=self.legacy) if u.expires_at > now]
        if any(not (needs.get(u.sha256, set()) & self._blocked) for u in live):
            raise UploadWaitError(
                f"{_who(req)}: the Files API quota is full ({error.message}); waiting for requests in progress "
                "to finish so batchgen can delete its own uploads they hold", QUOTA_WAIT_S * self.time_scale)
        self._blocked.discard(req.key)
        try:
            quota = await self.client.quota()
            held = f" (the account holds {quota.used_files} of {quota.max_files} files, {len(live)} of them batchgen's)"
        except ApiError:
            held = ""
        raise FilesApiError(
            f"{error.message}{held}; none of batchgen's own uploads can be freed, so {_who(req)} cannot upload "
            f'"{path}": delete files at evolink.ai, or wait for them to expire (72 h), then `batchgen retry`',
            status=error.status, code=error.code, request_id=error.request_id)


def _who(req: RequestRecord) -> str:
    where = f" ({req.source})" if req.source else ""
    return f'request "{req.item_id}"{where}'


def _blocking(error: ApiError, req: RequestRecord, path: Path) -> ApiError:
    """The same error (class, status, code, Retry-After: `decide()` sees what the API said) with the request
    it blocks and the file in its message."""
    if _who(req) in error.message:
        return error
    return type(error)(f'{error.message} — uploading "{path}" for {_who(req)}', status=error.status,
                       code=error.code, retry_after_s=error.retry_after_s, request_id=error.request_id,
                       body_excerpt=error.body_excerpt)


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
