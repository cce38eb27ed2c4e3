"""What a result image must be before it gets a name: the one image check both storages share.

A user judges batchgen by what lands in the output folder or bucket, so every image there is a complete,
verified image or absent. Bytes are checked with Pillow before they get a name (an HTML error page served
with status 200 must never become `sku123_1.png`), and the extension comes from the bytes, not from the
URL. Where the checked bytes then go — a local folder (`local.py`) or an S3-compatible bucket (`s3.py`) —
is the storage's business; both call `inspect_image` first.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Pillow format name → file extension.
EXTENSIONS: dict[str, str] = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif"}
# File extension → the Content-Type an object store serves the image with.
CONTENT_TYPES: dict[str, str] = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp",
                                 ".gif": "image/gif"}


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
