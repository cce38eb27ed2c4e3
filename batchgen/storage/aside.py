"""Images taken out of the results are kept, not deleted: under `_rejected/` in the output folder.

An image that failed an automatic check, or that a person rejected, was paid for and may still be
useful (a person may disagree with a check; a reviewer may change their mind), so it moves aside instead
of being overwritten by the next attempt. Its name keeps the image's own path and adds the first 12 hex
digits of its content hash — `_rejected/SKU-1/plain_1.3f2a9c01b4de.png` — so setting the same bytes aside
twice (a run killed between the move and its commit, then resumed) lands on the same file.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from batchgen.errors import LocalFaultError
from batchgen.storage.outputs import safe_target, write_atomic

REJECTED_DIR = "_rejected"


def aside_relpath(relpath: str, sha256: str, extension: str | None = None) -> str:
    """`_rejected/<relpath without extension>.<sha12><extension>` (POSIX, relative to the output folder)."""
    p = PurePosixPath(relpath)
    ext = extension if extension is not None else p.suffix
    stem = p.with_suffix("") if p.suffix else p
    return f"{REJECTED_DIR}/{stem}.{sha256[:12]}{ext}"


def write_aside(out_dir: Path, relpath: str, data: bytes) -> None:
    """Write downloaded bytes that will not become a result (atomically, like any output)."""
    write_atomic(safe_target(out_dir, relpath), data)


def move_aside(out_dir: Path, relpath: str, aside_rel: str) -> bool:
    """Move a saved result aside; False when it is not there (already moved, or deleted by someone)."""
    source = safe_target(out_dir, relpath)
    target = safe_target(out_dir, aside_rel)
    if not source.exists():
        return False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    except OSError as error:
        raise LocalFaultError("cannot move the image aside", str(source), error) from None
    return True
