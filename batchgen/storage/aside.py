"""Images taken out of the results are kept, not deleted: under `_rejected/` in the output folder.

An image that failed an automatic check, or that a person rejected, was paid for and may still be
useful (a person may disagree with a check; a reviewer may change their mind), so it moves aside instead
of being overwritten by the next attempt. Its name keeps the image's own path and adds the first 12 hex
digits of its content hash — `_rejected/SKU-1/plain_1.3f2a9c01b4de.png` — so setting the same bytes aside
twice (a run killed between the move and its commit, then resumed) lands on the same file.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from batchgen.storage.base import Storage
from batchgen.storage.outputs import CONTENT_TYPES

REJECTED_DIR = "_rejected"
# Images of requests the manifest no longer produces, moved off a name the current request needs.
SUPERSEDED_DIR = "_superseded"


def aside_relpath(relpath: str, sha256: str, extension: str | None = None, folder: str = REJECTED_DIR) -> str:
    """`<folder>/<relpath without extension>.<sha12><extension>` (POSIX, relative to the output folder)."""
    p = PurePosixPath(relpath)
    ext = extension if extension is not None else p.suffix
    stem = p.with_suffix("") if p.suffix else p
    return f"{folder}/{stem}.{sha256[:12]}{ext}"


def original_relpath(aside_rel: str, folder: str) -> str:
    """The path an image had before `aside_relpath` moved it into `folder` (its inverse)."""
    p = PurePosixPath(aside_rel).relative_to(folder)
    stem, _, _sha12 = p.stem.rpartition(".")
    return str(p.with_name(stem + p.suffix))


def write_aside(storage: Storage, relpath: str, data: bytes) -> None:
    """Write downloaded bytes that will not become a result (whole or not at all, like any output)."""
    storage.put_bytes(relpath, data, CONTENT_TYPES.get(PurePosixPath(relpath).suffix, "application/octet-stream"))


def move_aside(storage: Storage, relpath: str, aside_rel: str) -> bool:
    """Move a saved result aside; False when it is not there (already moved, or deleted by someone)."""
    return storage.move(relpath, aside_rel)
