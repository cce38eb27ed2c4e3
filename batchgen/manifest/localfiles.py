"""Checks of local reference images, so a bad photo is reported when the manifest is validated, not after
credits were spent or an upload was refused.

The API takes JPEG, PNG or WebP of at most 4 MB (catalog), and a PNG mask. The format is decided by the
file's content (magic bytes, confirmed by Pillow reading the header), never by its extension: a `.jpg`
that is really HEIC would otherwise pass here and fail at the API. `ReferenceChecker` caches the answer per
path because a catalogue of 500 rows often shares one photo.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from batchgen import catalog

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
)


def sniff_format(head: bytes) -> str | None:
    """JPEG, PNG or WEBP from a file's first bytes; None for anything else."""
    for magic, offset, name in _MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _describe_other(head: bytes) -> str:
    """A hint at what the file is instead, for the message."""
    hints = {b"GIF8": "a GIF", b"%PDF": "a PDF", b"BM": "a BMP", b"II*\x00": "a TIFF", b"MM\x00*": "a TIFF"}
    for magic, what in hints.items():
        if head.startswith(magic):
            return what
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "a HEIC/AVIF"
    return "not a JPEG, PNG or WebP image"


def check_reference_image(path: Path, *, mask: bool = False) -> str:
    """The image format of a local reference file ("JPEG", "PNG", "WEBP"), or ValueError saying what is
    wrong and what is allowed. A mask must be a PNG."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ValueError(f'local file "{path}" does not exist') from None
    except OSError as error:
        raise ValueError(f'local file "{path}" cannot be read: {error.strerror}') from None
    if not path.is_file():
        raise ValueError(f'"{path}" is not a file')
    limit = catalog.MAX_REFERENCE_IMAGE_BYTES
    if size > limit:
        raise ValueError(f'local file "{path}" is {size / 1024 / 1024:.1f} MB; at most '
                         f"{limit // (1024 * 1024)} MB is allowed")
    if size == 0:
        raise ValueError(f'local file "{path}" is empty')
    try:
        with path.open("rb") as fh:
            head = fh.read(32)
    except OSError as error:
        raise ValueError(f'local file "{path}" cannot be read: {error.strerror}') from None
    fmt = sniff_format(head)
    if fmt is None:
        raise ValueError(f'local file "{path}" is {_describe_other(head)}; use a JPEG, PNG or WebP image')
    try:
        with Image.open(path) as img:
            if img.format != fmt:
                raise ValueError(f'local file "{path}" looks like {fmt} but reads as {img.format}')
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f'local file "{path}" starts like a {fmt} but is not a readable image ({error})') from None
    if mask and fmt != "PNG":
        raise ValueError(f'mask "{path}" is a {fmt}; a mask must be a PNG (white = edit, black = keep)')
    return fmt


class ReferenceChecker:
    """Resolves and checks local references once per distinct path, remembering the answer."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, bool], str | None] = {}

    def error_for(self, path: Path, *, mask: bool = False) -> str | None:
        """None if the file is a usable reference image, else the message."""
        cache_key = (str(path), mask)
        try:
            return self._cache[cache_key]
        except KeyError:
            pass
        try:
            check_reference_image(path, mask=mask)
            result = None
        except ValueError as error:
            result = str(error)
        self._cache[cache_key] = result
        return result

    def checked_paths(self) -> list[str]:
        return sorted({p for p, _ in self._cache})
