"""Outputs in a local folder: safe paths, real-image checks, atomic and durable writes.

Bytes checked by `outputs.inspect_image` are written to a hidden temporary file beside the target, fsynced
and renamed over it with `os.replace`: a reader never sees half an image, and a run killed mid-write leaves
at most a hidden `.<name>.part` that the next attempt at the same image reuses. Paths come from
`naming.image_relpath` and are refused here too if they would leave the output folder, symlinks included
(defence in depth: the template is user input).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import IO

from batchgen.errors import LocalFaultError
from batchgen.storage.atomicfile import open_output
from batchgen.storage.base import Storage
from batchgen.storage.outputs import ImageInfo, inspect_image


def safe_target(out_dir: Path, relpath: str) -> Path:
    """`out_dir / relpath`, refusing absolute paths, `..` and symlinked escapes (ValueError)."""
    if not relpath or relpath.startswith(("/", "\\")) or "\x00" in relpath:
        raise ValueError(f"unsafe output path {relpath!r}")
    root = out_dir.resolve()
    target = (root / relpath).resolve()
    if target == root or root not in target.parents:
        raise ValueError(f"output path {relpath!r} leaves the output folder {root}")
    return target


def write_atomic(target: Path, data: bytes, *, make_parent: bool = True, durable: bool = True) -> None:
    """Write `data` to `target` so that the file is either complete or absent, even if we are killed.

    `durable`: fsync the file before its rename, so that it is on the disk, not only in the page cache, once
    this returns (a power cut or a kernel crash cannot take it back). Without it the file survives the
    process being killed but not the machine going down, which is what an SQLite store's commits promise
    too; the run after such a stop checks the images of the run that did not finish (engine/recovery.py).

    A write that fails (no space left, a read-only or vanished folder) removes its partial file and raises
    LocalFaultError naming the file and the cause: a fault of this machine, which stops the run resumably.
    `make_parent=False`: the caller knows the folder exists (it is made again if it vanished meanwhile).
    """
    tmp = target.with_name(f".{target.stem}.part")
    try:
        if make_parent:
            target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise LocalFaultError("cannot write the image", str(target), error) from None


def file_matches(path: Path, sha256: str) -> bool:
    """True if `path` exists with exactly this content hash (an image already saved by an earlier run)."""
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() == sha256
    except OSError:
        return False


class LocalStorage(Storage):
    """A job's outputs in the folder `root` (created on the first write)."""

    # The work of a local save is CPU (the checks decode the image) and short system calls: one thread per
    # core, since more only take turns at the GIL. Measured on 2 cores: 1.22 ms of runner CPU per image
    # with one thread, 1.36 with two, 1.53 with the default six (docs/benchmarks.md).
    parallel_writes = os.cpu_count() or 2
    writes_are_local = True

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = Path(root).resolve()
        # Whether each image is fsynced before its rename (write_atomic); the run decides by its store's own
        # durability (docs/run-engine.md, Durability).
        self.durable = durable
        self.location = str(self.root)
        # Folders already checked to be inside the root (symlinks resolved) and made: a job writes
        # thousands of files into a few folders, and resolving every path again cost more CPU than the
        # write itself. Writes replace the final name with os.replace, which never follows a symlink there.
        self._write_dirs: dict[str, Path] = {}

    def path(self, rel: str) -> Path:
        """The file `rel` stands for (ValueError if it would leave the folder)."""
        return safe_target(self.root, rel)

    def write_path(self, rel: str) -> Path:
        """Where to write `rel`: its folder checked once (inside the root, made), its name checked here."""
        folder, _, name = rel.rpartition("/")
        if not name or name in (".", "..") or "\x00" in rel or rel.startswith(("/", "\\")):
            raise ValueError(f"unsafe output path {rel!r}")
        parent = self._write_dirs.get(folder)
        if parent is None:
            parent = safe_target(self.root, folder) if folder else self.root
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise LocalFaultError("cannot create the output folder", str(parent), error) from None
            self._write_dirs[folder] = parent
        return parent / name

    def save_image(self, relpath_no_ext: str, data: bytes, info: ImageInfo | None = None) -> tuple[str, ImageInfo]:
        info = info or inspect_image(data)
        rel = relpath_no_ext + info.extension
        write_atomic(self.write_path(rel), data, make_parent=False, durable=self.durable)
        return rel, info

    def has_image(self, rel: str, sha256: str, size: int | None = None) -> bool:
        try:
            path = self.path(rel)
        except ValueError:
            return False
        return file_matches(path, sha256)

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self.path(rel).read_bytes()
        except (OSError, ValueError):
            return None

    def exists(self, rel: str) -> bool:
        try:
            return self.path(rel).is_file()
        except ValueError:
            return False

    def size_of(self, rel: str) -> int | None:
        try:
            return self.path(rel).stat().st_size
        except (OSError, ValueError):
            return None

    def names_under(self, rel_dir: str) -> set[str]:
        folder = self.root / rel_dir
        try:
            return {p.name for p in folder.iterdir() if p.is_file()}
        except OSError:
            return set()

    def put_bytes(self, rel: str, data: bytes, content_type: str) -> None:
        write_atomic(self.path(rel), data)

    def move(self, rel: str, new_rel: str) -> bool:
        source, target = self.path(rel), self.path(new_rel)
        if not source.exists():
            return False
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        except OSError as error:
            raise LocalFaultError("cannot move the image aside", str(source), error) from None
        return True

    def open_text(self, rel: str, *, newline: str | None = None) -> contextlib.AbstractContextManager[IO[str]]:
        return open_output(self.path(rel), newline=newline)

    def link(self, rel: str, expires_s: int) -> str:
        return self.path(rel).as_uri()
