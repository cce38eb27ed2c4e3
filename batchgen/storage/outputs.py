"""Putting result images on disk: safe paths, real-image checks, atomic writes.

A user judges batchgen by what lands in the output folder, so every file there is either a complete,
verified image or absent. Bytes are checked with Pillow before they get a name (an HTML error page served
with status 200 must never become `sku123_1.png`), written to a hidden temporary file beside the target,
fsynced and renamed over it with `os.replace` — a reader never sees half an image, and a run killed
mid-write leaves at most a hidden `.<name>.part` that the next attempt at the same image reuses. Paths come
from `naming.image_relpath` and are refused here too if they would leave the output folder (defence in
depth: the template is user input). The extension comes from the bytes, not from the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from batchgen.errors import LocalFaultError

# Pillow format name → file extension.
EXTENSIONS: dict[str, str] = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif"}


class NotAnImageError(ValueError):
    """The downloaded bytes are not an image of a type we accept."""


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's name: PNG, JPEG, WEBP, GIF
    width: int
    height: int
    sha256: str
    bytes: int

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def inspect_image(data: bytes) -> ImageInfo:
    """Identify and verify `data` as a PNG/JPEG/WebP/GIF image; NotAnImageError otherwise."""
    if not data:
        raise NotAnImageError("empty download")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            width, height = img.size
            img.verify()  # checks structure and checksums without decoding every pixel
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise NotAnImageError(f"not a valid image ({type(error).__name__}: {error})") from None
    if fmt not in EXTENSIONS:
        raise NotAnImageError(f"unsupported image type {fmt or 'unknown'}")
    return ImageInfo(fmt, width, height, hashlib.sha256(data).hexdigest(), len(data))


def safe_target(out_dir: Path, relpath: str) -> Path:
    """`out_dir / relpath`, refusing absolute paths, `..` and symlinked escapes (ValueError)."""
    if not relpath or relpath.startswith(("/", "\\")) or "\x00" in relpath:
        raise ValueError(f"unsafe output path {relpath!r}")
    root = out_dir.resolve()
    target = (root / relpath).resolve()
    if target == root or root not in target.parents:
        raise ValueError(f"output path {relpath!r} leaves the output folder {root}")
    return target


def write_atomic(target: Path, data: bytes) -> None:
    """Write `data` to `target` so that the file is either complete or absent, even if we are killed.

    A write that fails (no space left, a read-only or vanished folder) removes its partial file and raises
    LocalFaultError naming the file and the cause: a fault of this machine, which stops the run resumably.
    """
    tmp = target.with_name(f".{target.stem}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            # fsync per file: "done" in the store means the bytes are on disk, even after a power cut; the
            # store's own commits are WAL/NORMAL, so at worst a done image is recorded again, never lost.
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


def save_image(out_dir: Path, relpath_no_ext: str, data: bytes) -> tuple[str, ImageInfo]:
    """Check `data`, write it under `out_dir` with the extension of its real type; returns the relative
    path written (POSIX) and what the image is. Runs in a worker thread: Pillow and fsync block."""
    info = inspect_image(data)
    rel = relpath_no_ext + info.extension
    target = safe_target(out_dir, rel)
    write_atomic(target, data)
    return rel, info
