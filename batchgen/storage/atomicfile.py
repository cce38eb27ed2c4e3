"""Streaming atomic writes for the files batchgen produces from its state (export, provenance index, report).

`local.write_atomic` writes an image that is already in memory. An export of 100,000 rows should not be:
it is written row by row into a hidden temporary file beside the target, fsynced, and renamed over the
target with `os.replace` — so a reader (a shop import polling the folder, a person opening the report)
sees the previous complete file or the new complete file, never half of one, even if we are killed. On
any error the temporary file is removed and the old file stays.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_text(target: Path, *, newline: str | None = None) -> Iterator[IO[str]]:
    """Open a UTF-8 text stream whose content replaces `target` only when the block ends without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are meant to be shared like the images
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
