"""A downloaded image's bytes on their way to storage: identified, checked and stored in one call.

Identifying the bytes (`outputs.inspect_image`), the automatic checks (`quality.check_bytes`) and the
durable write (`Storage.save_image`) all block, on the CPU or on the disk, so the scheduler runs them off
the event loop. It runs them as one call to a worker thread rather than one each, because a hop to a
thread and back costs about as much CPU as the work itself on a small image (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from batchgen.engine import quality
from batchgen.models import QualitySettings
from batchgen.storage.base import Storage
from batchgen.storage.outputs import ImageInfo, inspect_image


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
    what the storage raises (LocalFaultError, StorageError). Blocking: call it in a worker thread."""
    info = inspect_image(data)
    verdict = quality.check_bytes(data, size, settings) if settings.enabled else quality.NOT_CHECKED
    if not verdict.passed and settings.on_fail != "keep":
        return Intake(info, verdict, None)
    rel, info = storage.save_image(relpath_no_ext, data, info)
    return Intake(info, verdict, rel)
