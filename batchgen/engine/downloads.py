"""The download side of a run: every finished task's images fetched, checked, stored and recorded.

A task the scheduler saw complete (or a resumed one whose images are not all stored yet) is queued here;
`download_concurrency` workers take them in turn. For each image: fetch it from the result host (no API
key, no limiter: media hosts are not the API), check and store it in one call (intake.py: on the event
loop for a small image on a quick local disk, else on the storage's own threads), record it in the store
with the others saved within a few milliseconds, and mark the request done with its last image. Failed
fetches are retried in place under the same rule as every call (errors.decide, engine/health.py); an
expired URL is fetched again through the task once; an image that fails its checks is set aside and its
request requeued.

The scheduler is the host: the downloads report back to it (a request requeued or failed, the run to stop)
and use its clients, its key pool and its rule for failed calls.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from batchgen.engine import intake, names
from batchgen.engine.health import CallHealth
from batchgen.engine.runstate import Counters, StopReason, Tracked
from batchgen.errors import ApiError, LocalFaultError, code_of, is_transient
from batchgen.manifest import naming
from batchgen.storage import aside, outputs
from batchgen.storage.base import StorageError
from batchgen.store.records import ImageRecord, SetAsideRecord

if TYPE_CHECKING:
    from batchgen.api.answers import TaskSnapshot
    from batchgen.api.client import EvolinkClient
    from batchgen.engine.scheduler import Scheduler

# A result URL that answers one of these has expired (results live 24 hours).
EXPIRED_STATUSES = frozenset({403, 404, 410})
QUALITY_CODE = "quality_check_failed"  # an image failed the automatic checks (issue 16)
# Images saved within this long are recorded in one transaction (sooner when every downloader waits on it).
SAVED_FLUSH_S = 0.01


class Downloads:
    """The queue of tasks whose images are to be brought home, and the workers that do it."""

    def __init__(self, host: Scheduler) -> None:
        self.host = host
        self.store = host.store
        self.storage = host.storage
        self.cfg = host.cfg
        self.counters: Counters = host.counters
        self.emit = host.emit
        self.media_health = CallHealth.scaled("the result host", host.cfg.patience_s, host.cfg.time_scale)
        self._queue: asyncio.Queue[Tracked] = asyncio.Queue()
        self.pending = 0  # queued or being downloaded
        # Where downloaded images are checked and stored (engine/intake.py), with as many threads as the
        # storage uses.
        self.intake = intake.Placement(self.storage, min(
            self.cfg.download_concurrency, self.storage.parallel_writes or self.cfg.download_concurrency))
        self._saved: list[tuple[ImageRecord, bool, asyncio.Future[None]]] = []  # images on disk, not yet recorded
        self._saved_flush: asyncio.Handle | None = None
        self._claimed: dict[str, str] = {}  # file name (no extension) → request key, claimed by this run
        # Whether a name may already belong to an image this run did not save (see start()).
        self._names_elsewhere = True

    def start(self) -> None:
        """At the start of the run: a name may belong to an image this run did not save when an earlier run
        saved images, or another runner shares the store. When neither holds (a fresh job, one runner), the
        per-image lookup in the store is skipped: every image saved from now on is in _claimed."""
        # Any image, of the current manifest or not: a request no longer in it still owns its file names.
        self._names_elsewhere = self.store.shared or bool(self.store.sample_images(1))

    def add(self, t: Tracked) -> None:
        """Queue a completed task (its result URLs committed) for download."""
        self.pending += 1
        self._queue.put_nowait(t)

    def close(self) -> None:
        """At the end of the run: record the images already in place, and let the intake threads go."""
        if self._saved_flush is not None:
            self._saved_flush.cancel()
            self.flush()
        self.intake.shutdown()

    async def worker(self) -> None:
        while True:
            t = await self._queue.get()
            try:
                if not self.host.halting:
                    await self._download(t)
            except LocalFaultError as error:
                self.host.local_fault(error)  # the folder is full or gone: stop; this download is done next run
            finally:
                self.pending -= 1
                self.host.wake()

    async def _download(self, t: Tracked) -> None:
        req = t.req
        # Only a request carried over from an earlier run can have images on disk already.
        have = {img.idx: img for img in self.store.images_for(req.key)} if t.resumed else {}
        urls = t.result_urls
        index = 1
        while index <= len(urls):
            url = urls[index - 1]
            rec = have.get(index)
            last = index == len(urls)
            if rec is not None and await self._stored(t, rec):
                if last:
                    self.store.finish_request(req.key)
                    self._on_done(t)
                index += 1
                continue
            data = await self._fetch(t, url)
            if data is None:
                return  # failed, requeued or halted: already recorded
            if isinstance(data, tuple):
                urls = data  # fresh result URLs after an expiry: start over with them
                index = 1
                continue
            try:
                rel = await self._name(t, index)
                got = await self.intake.take_in(rel, data, t.req.params.get("size"), self.cfg.quality)
            except StorageError as error:
                # Not the request's fault: it stays completed (its task id kept) and the next run stores it.
                self.host.halt(StopReason.STORAGE, f"{error}; resumable once the storage works")
                return
            except outputs.NotAnImageError as error:
                self._download_failed(t, "bad_image", f"{url}: {error}")
                return
            except ValueError as error:
                self._download_failed(t, "unsafe_path", str(error))
                return
            verdict, info = got.verdict, got.info
            if not verdict.passed and not await self._checks_failed(t, index, rel, data, got):
                return  # set aside, and requeued or failed (already recorded)
            assert got.rel is not None
            rel = got.rel
            await self._commit_image(ImageRecord(req.key, index, rel, url, info.bytes, info.sha256, info.width,
                                                 info.height, info.format, t.attempt_id, time.time(),
                                                 verdict.status, verdict.reasons or None), done=last)
            self.counters.images += 1
            self.emit("downloaded", {"key": req.key, "index": index, "path": rel, "bytes": info.bytes})
            if last:
                self._on_done(t)
            index += 1

    async def _checks_failed(self, t: Tracked, index: int, rel_no_ext: str, data: bytes,
                             got: intake.Intake) -> bool:
        """An image failed the automatic checks (engine/quality.py). True when it is kept anyway (on_fail
        "keep": stored and recorded with its verdict); otherwise it is set aside under _rejected/ and the
        request is requeued as a new attempt (within max_attempts; the credit cap is checked when it is
        claimed again) or, out of attempts, failed with `quality_check_failed`, and False is returned."""
        settings, verdict, info = self.cfg.quality, got.verdict, got.info
        key = t.req.key
        self.emit("check_failed", {"key": key, "index": index, "reasons": verdict.reasons,
                                   "action": settings.on_fail})
        if got.rel is not None:
            return True
        try:
            rel = aside.aside_relpath(rel_no_ext, info.sha256, info.extension)
            await asyncio.to_thread(aside.write_aside, self.storage, rel, data)
        except ValueError as error:
            self._download_failed(t, "unsafe_path", str(error))
            return False
        requeue = t.attempts < self.cfg.max_attempts
        message = f"image {index} failed its checks ({verdict.reasons}); kept as {rel}"
        if not requeue:
            message += f"; gave up after {t.attempts} attempt(s)"
        self.store.reviews.reject_image(SetAsideRecord(key, index, t.attempt_id, rel, info.sha256, info.bytes,
                                                       info.width, info.height, info.format, "quality",
                                                       verdict.reasons, time.time()),
                                        requeue=requeue, code=QUALITY_CODE, message=message)
        if requeue:
            self.host.on_requeued(key, QUALITY_CODE, 0.0, None)
        else:
            self.host.on_failed(key, QUALITY_CODE, message)
        return False

    async def _stored(self, t: Tracked, rec: ImageRecord) -> bool:
        """Whether an image recorded by an earlier run is still stored with its content (not written again)."""
        try:
            return await asyncio.to_thread(self.storage.has_image, rec.path, rec.sha256, rec.bytes)
        except StorageError as error:
            self.host.halt(StopReason.STORAGE, f"{error}; resumable once the storage works")
            return False

    async def _name(self, t: Tracked, index: int) -> str:
        req = t.req
        rel = naming.image_relpath(self.cfg.filename_template, item_id=req.item_id, variant=req.variant,
                                   metadata=req.metadata, model=t.model, key=req.key, index=index)
        # Two requests must never share a file: a template that names them alike gets the key appended. A
        # name is claimed here, before the write, so two downloads in flight cannot both take it.
        owner = self._claimed.get(rel)
        if owner is None and self._names_elsewhere:
            owner = self.store.path_owner([rel + ext for ext in outputs.EXTENSIONS.values()])
            if owner is not None and owner != req.key and not self.store.is_live(owner):
                # The name is the current request's: the image of the one it replaced moves aside (names.py).
                self._claimed[rel] = req.key
                await names.supersede(self.store, self.storage, owner, rel)
                return rel
        if owner is not None and owner != req.key:
            rel = f"{rel}-{req.key[-8:]}"
        self._claimed[rel] = req.key
        return rel

    async def _commit_image(self, img: ImageRecord, done: bool) -> None:
        """Record a saved image, together with the others saved within SAVED_FLUSH_S (one transaction);
        returns once it is committed. The file is in place already: a run killed before the commit fetches
        it again (no credits) and writes the same name."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._saved.append((img, done, fut))
        if len(self._saved) >= self.cfg.download_concurrency:
            # Every downloader is waiting on this commit: nothing more can join the batch.
            if self._saved_flush is not None:
                self._saved_flush.cancel()
            self.flush()
        elif self._saved_flush is None:
            self._saved_flush = loop.call_later(SAVED_FLUSH_S, self.flush)
        await fut

    def flush(self) -> None:
        """Record the images saved since the last flush in one transaction, and release their downloaders
        (with the error, if the commit failed: the images are in place and the next run records them)."""
        self._saved_flush = None
        batch, self._saved = self._saved, []
        if not batch:
            return
        try:
            self.store.record_images([(img, done) for img, done, _ in batch])
        except BaseException as error:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(error)
            return
        for _, _, fut in batch:
            if not fut.done():
                fut.set_result(None)

    async def _fetch(self, t: Tracked, url: str) -> bytes | tuple[str, ...] | None:
        """The bytes of one result. Transient failures (5xx, timeouts, drops) are retried in place with the
        rule for failed calls, never failing the request; an expired URL is re-fetched once through the task.
        Returns new URLs (tuple) after a re-fetch, None when the request was dealt with (or the run halts)."""
        tries = 0
        while True:
            if self.host.halting:
                return None
            try:
                data = (await self.host.client.download(url)).data
            except ApiError as error:
                if is_transient(error):
                    tries += 1
                    await asyncio.sleep(self.host.call_failed(error, tries, self.media_health))
                    continue
                self.media_health.ok()
                if error.status in EXPIRED_STATUSES:
                    return await self._expired(t, error)
                self._download_failed(t, code_of(error), error.message)
                return None
            self.media_health.ok()
            return data

    async def _look_again(self, task_id: str, client: EvolinkClient | None = None) -> TaskSnapshot | None:
        """One poll of a task (with `client`: the key that created it), retried in place while the API fails
        transiently; None if it says no."""
        tries = 0
        while not self.host.halting:
            try:
                snap = await (client or self.host.client).get_task(task_id)
            except ApiError as error:
                if not is_transient(error):
                    self.host.api_health.ok()
                    return None
                tries += 1
                await asyncio.sleep(self.host.call_failed(error, tries))
                continue
            self.host.api_health.ok()
            return snap
        return None

    async def _expired(self, t: Tracked, error: ApiError) -> tuple[str, ...] | None:
        # Only the key that created the task may look at it again (a revoked or missing key cannot).
        if not t.refetched and t.task_id and (self.host.pool is None or (t.key is not None and t.key.can_poll)):
            t.refetched = True
            snap = await self._look_again(t.task_id, self.host.client_for(t))
            if self.host.halting:
                return None
            if snap is not None and snap.status == "completed" and snap.results and snap.results != t.result_urls:
                t.result_urls = snap.results
                self.store.update_result_urls(t.attempt_id, snap.results)
                return snap.results
        message = f"result URL no longer available ({error}); results expire 24 hours after completion"
        if self.cfg.regenerate_expired and t.attempts < self.cfg.max_attempts:
            # A regeneration is paid again, so it counts towards max_attempts.
            self.store.abandon_attempt(t.attempt_id, "result_expired", message)
            self.store.requeue(t.req.key, time.time(), "result_expired", message)
            self.host.on_requeued(t.req.key, "result_expired", 0.0, None)
        elif self.cfg.regenerate_expired:
            self._download_failed(t, "result_expired", f"{message}; gave up after {t.attempts} attempt(s)")
        else:
            self._download_failed(t, "result_expired", message + "; set run.regenerate_expired to generate again")
        return None

    def _download_failed(self, t: Tracked, code: str, message: str) -> None:
        self.store.fail(t.req.key, code, message)
        self.host.on_failed(t.req.key, code, message)

    def _on_done(self, t: Tracked) -> None:
        c = self.counters
        c.done += 1
        c.done_this_run += 1
        self.emit("done", {"key": t.req.key, "images": len(t.result_urls)})
