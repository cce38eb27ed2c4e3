"""A downloaded image's bytes on their way to storage: identified, checked and stored, and where that runs.

Identifying the bytes (`outputs.inspect_image`), the automatic checks (`quality.check_bytes`) and the
durable write (`Storage.save_image`) all block, on the CPU or on the disk. For a real-size image they take
milliseconds (a 1024 px PNG decodes in 7-25 ms), so they run off the event loop, as one call to a worker
thread rather than one each. For a small image on a local disk the whole intake is cheaper than the hop to a
thread and back (the thread contends with the loop for the GIL at every step): it runs on the loop, which
`Placement` decides per image, sending them back to the threads once the disk turns slow (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass

from batchgen.engine import quality
from batchgen.models import QualitySettings
from batchgen.storage.base import Storage
from batchgen.storage.outputs import ImageInfo, inspect_image

# An image is "small" at or under both: its identification and hash take under 0.1 ms, its decode and
# checks under 0.3 ms (measured on an emulator-sized PNG up to 128 px: 0.11-0.25 ms in all).
INLINE_MAX_BYTES = 64 * 1024
INLINE_MAX_PIXELS = 128 * 128
# A small intake on the loop that takes longer than this (a slow or network disk waiting in fsync) holds up
# every poll and submission behind it; SLOW_IN_A_ROW such intakes send the next ones to the threads. One
# alone does not: the first intake of a run imports Pillow's plugins, and a disk has the odd slow fsync.
INLINE_MAX_S = 0.002
SLOW_IN_A_ROW = 3
# While the intakes are on the threads, every this-many-th small image is tried on the loop again; a quick
# one brings them back, so that a disk which was slow for a while does not keep them away for good.
PROBE_EVERY = 100


@dataclass(frozen=True)
class Intake:
    """What became of one image: what it is, what the checks said, and where it is stored (None: it failed
    its checks and was not stored; the caller sets it aside)."""

    info: ImageInfo
    verdict: quality.Verdict
    rel: str | None


def take_in(storage: Storage, relpath_no_ext: str, data: bytes, size: str | None,
            settings: QualitySettings) -> Intake:
    """Identify `data`, run the checks, and store it unless it failed them (with on_fail "keep" it is stored
    anyway). Raises NotAnImageError (not an image of a type we accept), ValueError (an unsafe name), and
    what the storage raises (LocalFaultError, StorageError). Blocking."""
    return check_and_store(storage, relpath_no_ext, data, inspect_image(data), size, settings)


def check_and_store(storage: Storage, relpath_no_ext: str, data: bytes, info: ImageInfo, size: str | None,
                    settings: QualitySettings) -> Intake:
    """`take_in` for bytes already identified as `info`."""
    verdict = quality.check_bytes(data, size, settings) if settings.enabled else quality.NOT_CHECKED
    if not verdict.passed and settings.on_fail != "keep":
        return Intake(info, verdict, None)
    rel, info = storage.save_image(relpath_no_ext, data, info)
    return Intake(info, verdict, rel)


class Placement:
    """Where each image's intake runs, and the intake threads: on the event loop or on a worker thread.

    On the loop only for a storage that writes to a local disk (a bucket's write waits on the network), a
    small image (bytes first, then pixels once identified), and unless the last SLOW_IN_A_ROW intakes on
    the loop each took over INLINE_MAX_S; then on the threads, with a probe on the loop every PROBE_EVERY
    small images, which brings them back when it is quick.
    """

    def __init__(self, storage: Storage, threads: int = 1) -> None:
        self.storage = storage
        self.enabled = storage.writes_are_local
        self.on_loop = True
        self._slow_in_a_row = 0
        self._skipped = 0
        # Threads start on the first image sent to them, so a run that keeps every intake on the loop has none.
        self._threads = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="batchgen-intake")

    async def take_in(self, relpath_no_ext: str, data: bytes, size: str | None,
                      settings: QualitySettings) -> Intake:
        """`take_in`, on the loop or on an intake thread, as the rules above decide."""
        loop = asyncio.get_running_loop()
        if not self.try_on_loop(len(data)):
            return await loop.run_in_executor(self._threads, take_in, self.storage, relpath_no_ext, data, size,
                                              settings)
        start = time.perf_counter()
        info = inspect_image(data)
        if not self.small(info):
            return await loop.run_in_executor(self._threads, check_and_store, self.storage, relpath_no_ext, data,
                                              info, size, settings)
        got = check_and_store(self.storage, relpath_no_ext, data, info, size, settings)
        self.took(time.perf_counter() - start)
        return got

    def shutdown(self) -> None:
        """Let the intake threads go (at the end of the run)."""
        self._threads.shutdown(wait=False, cancel_futures=True)

    def try_on_loop(self, nbytes: int) -> bool:
        """Whether to identify these bytes on the loop (then `small(info)` decides about the rest)."""
        if not self.enabled or nbytes > INLINE_MAX_BYTES:
            return False
        if self.on_loop:
            return True
        self._skipped += 1
        if self._skipped >= PROBE_EVERY:
            self._skipped = 0
            return True
        return False

    @staticmethod
    def small(info: ImageInfo) -> bool:
        return info.width * info.height <= INLINE_MAX_PIXELS

    def took(self, seconds: float) -> None:
        """Record the wall time of one intake that ran on the loop."""
        if seconds > INLINE_MAX_S:
            self._slow_in_a_row += 1
            if self._slow_in_a_row >= SLOW_IN_A_ROW:
                self.on_loop = False
        else:
            self._slow_in_a_row = 0
            self.on_loop = True
