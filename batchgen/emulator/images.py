"""Result images: small, real PNG files with the requested aspect ratio, drawn from the prompt.

The same prompt, size and index always give the same bytes, so runs are reproducible and a test can tell
the images of different prompts apart. Rendering costs far more than serving, so bytes are cached.

A task can be made to return bad images on purpose (`fault`, from a rule or a scenario share; see
faults.IMAGE_FAULTS): "blank" is one flat colour, "wrong_aspect" the requested ratio on its side (2:1 for
a square), "tiny" a 16 px thumbnail — what batchgen's quality checks must catch. `generation` counts the
earlier completed tasks of the same prompt and size, so a regenerated image differs from the one it
replaces (the first task of a prompt still gives the same bytes on every run).
"""

from __future__ import annotations

import hashlib
import io
from functools import lru_cache

from PIL import Image, ImageDraw

SHORT_SIDE_PX = 64
TINY_SIDE_PX = 16
DEFAULT_SIZE = "1:1"


def dimensions(size: str | None, short_side: int = SHORT_SIDE_PX) -> tuple[int, int]:
    """Pixel width and height for a ratio ("16:9") or pixel ("1024x1536") size, scaled down so the short
    side is `short_side` and the ratio is kept."""
    text = size or DEFAULT_SIZE
    sep = ":" if ":" in text else "x"
    w, h = (int(part) for part in text.split(sep, 1))
    if w >= h:
        return round(short_side * w / h), short_side
    return short_side, round(short_side * h / w)


@lru_cache(maxsize=4096)
def render_png(prompt: str, size: str | None, index: int, fault: str | None = None, generation: int = 0,
               variant: str = "") -> bytes:
    width, height = dimensions(size, TINY_SIDE_PX if fault == "tiny" else SHORT_SIDE_PX)
    if fault == "wrong_aspect":
        width, height = (height, width) if width != height else (2 * width, height)
    # A later task with the same prompt (a regeneration) draws a different picture, as a real model would:
    # `generation` counts this emulator's earlier tasks of the prompt, and `variant` (the submit's
    # idempotency key: a new attempt has a new one) keeps that true across emulators, e.g. one per
    # `batchgen run --emulator`. A resend of the same attempt replays its task and its picture.
    seed = f"{index}\0{prompt}" + (f"\0{generation}" if generation else "") + (f"\0{variant}" if variant else "")
    digest = hashlib.sha256(seed.encode()).digest()
    image = Image.new("RGB", (width, height), tuple(digest[0:3]))
    if fault == "blank":
        out = io.BytesIO()
        image.save(out, format="PNG", compress_level=1)
        return out.getvalue()
    draw = ImageDraw.Draw(image)
    # A few shapes whose colours and places come from the digest: distinct images per prompt and index.
    for i in range(4):
        b = digest[3 + i * 7: 10 + i * 7]
        x0, y0 = b[0] * width // 256, b[1] * height // 256
        x1, y1 = x0 + 8 + b[2] * width // 512, y0 + 8 + b[3] * height // 512
        shape = draw.ellipse if b[4] % 2 else draw.rectangle
        shape((x0, y0, x1, y1), fill=(b[4], b[5], b[6]))
    # One stripe per index so images of the same task differ visibly, too.
    draw.rectangle((0, height - 4, min(width, 8 * (index + 1)), height), fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()
