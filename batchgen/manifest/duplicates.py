"""Duplicate detection in flat memory: one 64-bit hash per item id or output file name, kept in arrays and
spilled to temporary files, so a million rows can be checked for repeats without holding the rows.

Only the colliding hashes come back; the manifest walks its rows again to name them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from array import array


class HashLog:
    """A multiset of 64-bit hashes in flat memory: buffered in `PARTITIONS` arrays by hash value, each
    spilled to its own temporary file when full, and checked for repeats one partition at a time. A million
    ids cost about 8 MB of temporary disk and a few MB of memory however many rows there are."""

    PARTITIONS = 64
    BUFFER = 2048  # hashes per partition held in memory before spilling (16 KB)

    def __init__(self) -> None:
        self._buffers = [array("q") for _ in range(self.PARTITIONS)]
        self._dir: str | None = None

    def add(self, value: int) -> None:
        buf = self._buffers[value % self.PARTITIONS]
        buf.append(value)
        if len(buf) >= self.BUFFER:
            self._spill(value % self.PARTITIONS)

    def _spill(self, part: int) -> None:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="batchgen-dups-")
        with open(os.path.join(self._dir, str(part)), "ab") as fh:
            self._buffers[part].tofile(fh)
        self._buffers[part] = array("q")

    def repeated(self) -> set[int]:
        """Hash values added more than once."""
        out: set[int] = set()
        for part in range(self.PARTITIONS):
            values = array("q")
            if self._dir is not None:
                path = os.path.join(self._dir, str(part))
                if os.path.exists(path):
                    with open(path, "rb") as fh:
                        values.frombytes(fh.read())
            values.extend(self._buffers[part])
            prev = None
            for h in sorted(values):
                if h == prev:
                    out.add(h)
                prev = h
        return out

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
