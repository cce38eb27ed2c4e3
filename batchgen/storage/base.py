"""The storage interface: where a job's outputs live, whether a local folder or an S3-compatible bucket.

Everything that writes or reads a job's outputs goes through one `Storage`: the downloaders (images), the
end-of-run files (`results.csv`, `index.jsonl`), the provenance lookup and the report (thumbnails, links).
Names are always relative POSIX paths under the storage's root (a folder, or a bucket and prefix), the same
strings the store records, so a job's database means the same thing whichever storage holds its files.

The guarantees are the same for both implementations, and the tests hold both to them:

* `save_image` checks the bytes (`outputs.inspect_image`), writes them so a reader sees the whole image or
  nothing, and returns only once the write is durable and verified (fsync on disk; a SHA-256 checksum the
  store confirmed for a bucket). Only then does the scheduler record the image and count it done.
* `has_image` says whether an earlier run already stored exactly these bytes, so a resumed run does not
  write them again.
* Nothing is written outside the root: a name with `..`, an absolute name or a NUL raises ValueError.

The methods block (fsync, network); async code calls them with `asyncio.to_thread`. Faults of the storage
itself stop the run, resumable, with a message and no traceback: a local folder raises `LocalFaultError`
(disk full, read-only or vanished folder), a bucket `StorageError` (credentials refused, the store
unreachable call after call). Throttling is not a fault: it is retried inside.
"""

from __future__ import annotations

import abc
import contextlib
from typing import IO

from batchgen.errors import RunStoppedError
from batchgen.storage.outputs import ImageInfo


class StorageError(RunStoppedError):
    """The output bucket refused or failed an operation; the run stops and can be resumed once fixed
    (exit 3). Messages name the location and the store's error code, never a credential."""


class Storage(abc.ABC):
    """One job's output location. Use as a context manager; `close()` releases connections."""

    #: What the store records as the job's output location: an absolute folder or `s3://bucket/prefix`.
    location: str
    #: How many `save_image` calls are worth running at once (worker threads); None: one per downloader.
    #: A bucket's writes wait on the network, so every downloader may have one under way.
    parallel_writes: int | None = None
    #: True when `save_image` writes to a local disk: short blocking calls, which the engine may make on
    #: the event loop for a small image (engine/intake.py). A bucket's writes wait on the network: never.
    writes_are_local: bool = False

    @abc.abstractmethod
    def save_image(self, relpath_no_ext: str, data: bytes, info: ImageInfo | None = None) -> tuple[str, ImageInfo]:
        """Check `data`, store it under `relpath_no_ext` + the extension of its real type, verified.
        Returns the relative path stored and what the image is. NotAnImageError, ValueError (unsafe name).
        `info`: what `outputs.inspect_image` already found in these very bytes (not checked again)."""

    @abc.abstractmethod
    def has_image(self, rel: str, sha256: str, size: int | None = None) -> bool:
        """True if `rel` is stored with exactly this content (an image saved by an earlier run)."""

    @abc.abstractmethod
    def read_bytes(self, rel: str) -> bytes | None:
        """The content of `rel`, or None if it is not there."""

    @abc.abstractmethod
    def exists(self, rel: str) -> bool:
        """Whether `rel` is there."""

    def size_of(self, rel: str) -> int | None:
        """The size of `rel` as stored, cheaply (a stat), or None: not there, or not known cheaply. Only a
        local folder answers; a bucket's objects are durable once their PUT is answered."""
        return None

    @abc.abstractmethod
    def names_under(self, rel_dir: str) -> set[str]:
        """The names (without the folder) of the files directly under `rel_dir` (a cache's listing)."""

    @abc.abstractmethod
    def put_bytes(self, rel: str, data: bytes, content_type: str) -> None:
        """Store derived bytes (a thumbnail) under `rel`, replacing what was there, whole or not at all."""

    @abc.abstractmethod
    def move(self, rel: str, new_rel: str) -> bool:
        """Move `rel` to `new_rel` (an image set aside); False when `rel` is not there."""

    @abc.abstractmethod
    def open_text(self, rel: str, *, newline: str | None = None) -> contextlib.AbstractContextManager[IO[str]]:
        """A UTF-8 text stream whose content replaces `rel` only when the block ends without error."""

    @abc.abstractmethod
    def link(self, rel: str, expires_s: int) -> str:
        """A URL a browser anywhere can open for `rel` (a presigned GET for a bucket, valid `expires_s`)."""

    def close(self) -> None:  # noqa: B027 - a local folder holds nothing to release
        """Release connections; pending calls of other threads are cancelled."""

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self, rel: str) -> str:
        """Where `rel` is, for messages: the location and the name."""
        return f"{self.location.rstrip('/')}/{rel}"


def check_relpath(rel: str) -> list[str]:
    """The segments of a relative POSIX name, refusing anything that could leave the root (ValueError):
    empty names, absolute names, backslashes, NUL, and `.`, `..` or empty segments. Used for bucket keys,
    where no file system resolves `..` for us; the local folder checks resolved paths as well."""
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        raise ValueError(f"unsafe output path {rel!r}")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"output path {rel!r} leaves the output prefix")
    return parts

